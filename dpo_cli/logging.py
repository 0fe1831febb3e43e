"""Where metrics go: the run dir's metrics.jsonl (always), wandb (logger=wandb), TensorBoard
(logger=tensorboard, or logger.tensorboard=true beside wandb) and the console.

The console is quiet unless `logger.verbose=true`: no library progress bars or loading chatter, no bars at
all when the output is not a terminal, a one-line wandb note instead of its summary; a run ends with a
summary of its first and last eval points (`closing_summary`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def wandb_mode(requested: str) -> str:
    """`auto` is online when an API key is configured, else offline with a note (runs sync later)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return "online"
    print("dpo-run: no wandb API key found; logging offline (`wandb sync <run dir>/wandb/offline-run-*`)")
    return "offline"


def quiet_console(verbose: bool) -> None:
    """Silence transformers' and datasets' loading bars and notes (`verbose=True`: leave them on)."""
    if verbose:
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")


def wandb_group(cfg: DictConfig, sweep_dir: Path | None = None) -> str:
    """A run's wandb group: its sweep (`<exp>/<stage>/multirun-beta`, named from the sweep's overrides),
    or its experiment for a single run."""
    if sweep_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            sweep_dir = Path(HydraConfig.get().sweep.dir)
    if sweep_dir is None:
        return str(cfg.exp_name)
    return f"{cfg.exp_name}/{OmegaConf.select(cfg, 'stage', default='sweep')}/{Path(sweep_dir).name}"


def wandb_tags(cfg: DictConfig, group: str) -> list[str]:
    tags = [str(cfg.stage), f"model:{cfg.model.name}", f"data:{cfg.data.name}"]
    if cfg.stage in ("sft", "dpo"):
        tags.append(f"loss:{cfg.loss.name}")
    if group != cfg.exp_name:  # wandb takes tags of at most 64 characters
        sweep = Path(group).name
        digest = hashlib.sha256(sweep.encode()).hexdigest()[:8]
        tags.append(f"sweep:{sweep}" if len(sweep) <= 58 else f"sweep:{sweep[:49]}-{digest}")
    return tags


def closing_summary(metrics: list[dict[str, Any]]) -> str | None:
    """`summary: step 0 -> 80: reward 0.140 -> 0.657, KL 0.000 -> 9.419, accuracy 0.500 -> 0.709`: the
    first and last value of each eval metric a researcher looks at first (None without eval lines)."""
    keys = {
        "eval/reward": "reward",
        "eval/kl": "KL",
        "eval/rewards/accuracies": "accuracy",
        "eval/loss": "loss",
    }
    parts, steps = [], []
    for key, name in keys.items():
        points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        if points:
            parts.append(f"{name} {points[0][1]:.3f} -> {points[-1][1]:.3f}")
            steps = steps or [points[0][0], points[-1][0]]
    return f"summary: step {steps[0]} -> {steps[1]}: " + ", ".join(parts) if parts else None


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class RunLogger:
    """Writes config.yaml once, then one JSON line per `log` call; mirrors both to wandb. Under DeepSpeed
    only rank 0 writes and logs; on the other ranks every call does nothing."""

    def __init__(self, cfg: DictConfig, run_dir: Path, provenance: dict | None = None):
        """`provenance`: which models the run started from (dpo_cli.engine.rundir.provenance), recorded
        in config.yaml and the wandb config."""
        from dpo_cli.config import stage_view
        from dpo_cli.distributed import is_main

        self.enabled = is_main()
        self.wandb_run = None
        self.tensorboard = None
        if not self.enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = stage_view(cfg) | ({"provenance": provenance} if provenance else {})
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        self.num_table_samples = cfg.eval.num_table_samples
        if cfg.logger.name == "tensorboard" or cfg.logger.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            self.tensorboard.add_text("config", "```\n" + OmegaConf.to_yaml(resolved) + "\n```")
        if cfg.logger.name == "wandb":
            import wandb

            # One wandb run per run dir: a resumed run continues the same wandb run. Every run's wandb
            # files live in <output_root>/wandb/, so one `wandb sync` there finds every offline run.
            id_file = self.run_dir / "wandb_run_id"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            group = wandb_group(cfg)
            wandb_dir = Path(cfg.output_root)
            self.wandb_run = wandb.init(
                id=id_file.read_text().strip(),
                resume="allow",
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=group,
                job_type=str(cfg.stage),
                tags=wandb_tags(cfg, group),
                name=f"{cfg.exp_name}/{cfg.stage}/{cfg.run_name}",
                config=resolved | {"run_dir": str(self.run_dir)},
                dir=str(wandb_dir),
                mode=wandb_mode(cfg.logger.mode),
                settings=wandb.Settings(quiet=not cfg.logger.verbose),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, global_step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """A few (prompt, completion, reward) rows as a wandb Table (all rows are in samples.jsonl)."""
        if self.wandb_run is None or not rows:
            return
        import wandb

        shown = rows[: self.num_table_samples]
        table = wandb.Table(columns=list(shown[0]), data=[list(r.values()) for r in shown])
        self.wandb_run.log({"eval/samples": table}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            where = self.wandb_run.url or f"offline: `wandb sync {self.wandb_run.dir.rsplit('/files', 1)[0]}`"
            self.wandb_run.finish()
            print(f"wandb: {where}")


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
