"""Run dirs: refusing to clobber an earlier run, resuming one, finding the SFT checkpoint, the `next:` hint.

`outputs/<exp_name>/<stage>/<run_name>/` holds one run. `prepare` makes it ready (and, under DeepSpeed,
only rank 0 touches it while the other ranks wait), fixes threads and seeds, and says where a resumed run
continues from.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpo_cli import distributed
from dpo_cli.checkpoints import TRAINER_STATE, latest_resumable
from dpo_cli.errors import ConfigError
from dpo_cli.models import resolve_device

RUN_FILES = ("metrics.jsonl", "samples.jsonl", "final", "checkpoints", "wandb", "wandb_run_id")


@dataclass(frozen=True)
class RunDir:
    path: Path
    device: torch.device
    resume_from: Path | None = None
    """The checkpoint a `resume=true` run continues from (None: from the start)."""
    start_step: int = 0
    """Optimizer steps already done (the resumed checkpoint's step)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_run_dir(cfg: DictConfig, run_dir: Path) -> list[Path]:
    """Refuse to clobber an earlier run unless told (`overwrite=true` replaces it, `resume=true` continues
    it); returns the earlier run's files."""
    previous = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if cfg.resume:
        if (run_dir / "final").exists():
            raise ConfigError(f"{run_dir} finished already (final/ exists): nothing to resume")
    elif previous and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run: pass resume=true to continue it, overwrite=true to replace it, "
            "or run_name=NAME for a new run dir"
        )
    return previous


def prepare(cfg: DictConfig, run_dir: Path) -> RunDir:
    """Make the run dir ready without losing anything (`check_run_dir`), then fix threads and seeds."""
    if distributed.is_main():
        _prepare_files(cfg, run_dir)
    distributed.barrier()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda" and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    resume_from = latest_resumable(run_dir) if cfg.resume else None
    return RunDir(Path(run_dir), device, resume_from, _step_of(resume_from))


def _step_of(checkpoint: Path | None) -> int:
    return torch.load(checkpoint / TRAINER_STATE, weights_only=False)["step"] if checkpoint else 0


def _prepare_files(cfg: DictConfig, run_dir: Path) -> None:
    previous = check_run_dir(cfg, run_dir)
    if not cfg.resume:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    checkpoint = latest_resumable(run_dir)
    step = _step_of(checkpoint)
    print(f"resume: from {checkpoint} (step {step})" if checkpoint else f"resume: no checkpoint in {run_dir}")
    # Lines written after the checkpoint will be written again by the resumed run.
    for log in (run_dir / "metrics.jsonl", run_dir / "samples.jsonl"):
        if log.exists():
            lines = log.read_text().splitlines(keepends=True)
            log.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def find_sft_checkpoint(cfg: DictConfig) -> Path:
    """`sft_checkpoint=`, else the newest SFT `final/` of this experiment trained from the same model
    preset: the policy init and reference of the preference stages, the reference of `eval`."""
    if cfg.sft_checkpoint:
        return Path(cfg.sft_checkpoint)
    sft_root = Path(cfg.output_root) / cfg.exp_name / "sft"
    candidates = [
        final
        for final in sft_root.rglob("final")
        if (final / "config.json").is_file()
        and (final.parent / "config.yaml").is_file()
        and OmegaConf.load(final.parent / "config.yaml").model.name == cfg.model.name
    ]
    if not candidates:
        raise ConfigError(
            f"no SFT checkpoint for model={cfg.model.name} under {sft_root}: run `dpo-run sft"
            f"{'' if cfg.exp_name == 'default' else ' exp_name=' + cfg.exp_name} model={cfg.model.name}` "
            "first, or set sft_checkpoint=/path/to/checkpoint"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def finish(run_dir: Path, next_command: str, why: str, *, carry_overrides: bool = True) -> None:
    """Tell the user what the run wrote and what to run next (with the overrides that locate this run)."""
    if not distributed.is_main():
        return
    written = ", ".join(
        sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if p.name[0] != ".")
    )
    print(f"\nwrote {run_dir}/: {written}")
    carried = ""
    if carry_overrides and HydraConfig.initialized():
        keep = ("exp_name", "model", "data", "output_root", "experiment")
        overrides = HydraConfig.get().overrides.task
        carried = "".join(f" {o}" for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in keep)
    print(f"next: {next_command}{carried}   ({why})")
