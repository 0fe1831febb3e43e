"""Where metrics go: the run dir's metrics.jsonl (always), wandb (logger=wandb) and the console."""

from __future__ import annotations

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


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class RunLogger:
    """Writes config.yaml once, then one JSON line per `log` call; mirrors both to wandb. Under DeepSpeed
    only rank 0 writes and logs; on the other ranks every call does nothing."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        from dpo_cli.distributed import is_main

        self.enabled = is_main()
        self.wandb_run = None
        if not self.enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        self.wandb_run = None
        self.num_table_samples = cfg.eval.num_table_samples
        if cfg.logger.name == "wandb":
            import wandb

            # One wandb run per run dir: a resumed run continues the same wandb run.
            id_file = self.run_dir / "wandb_run_id"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self.wandb_run = wandb.init(
                id=id_file.read_text().strip(),
                resume="allow",
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=cfg.exp_name,
                job_type=cfg.stage,
                name=f"{cfg.exp_name}/{cfg.stage}/{cfg.run_name}",
                config=resolved,
                dir=str(self.run_dir),
                mode=wandb_mode(cfg.logger.mode),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

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
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
