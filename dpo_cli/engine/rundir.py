"""Run dirs: refusing to clobber an earlier run, resuming one, finding the SFT checkpoint, the `next:` hint.

`outputs/<exp_name>/<stage>/<run_name>/` holds one run. `claimed` holds it for a run's whole life (a lock;
`overwrite=true` keeps the earlier run aside until the new one finishes); `prepare` makes it ready (and,
under DeepSpeed, only rank 0 touches it while the other ranks wait), fixes threads and seeds, and says
where a resumed run continues from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpo_cli import distributed
from dpo_cli.checkpoints import TRAINER_STATE, check_weights, latest_resumable
from dpo_cli.config import stage_view
from dpo_cli.errors import ConfigError, RunStopped
from dpo_cli.logging import closing_summary, read_metrics
from dpo_cli.models import resolve_device

LOCK_FILE = ".lock"
ASIDE_PREFIX = ".previous-"
# Set while a process holds a run dir, so that the ranks it launches (which inherit it) do not claim it too.
_HELD_ENV = "DPO_CLI_RUN_DIR_HELD"
# What `resume=true` may change: how long and how often, not what is trained (config.yaml must agree on
# everything else), and where the run lives (a run dir copied or moved under another name). A key ending
# in "." covers its whole group.
RESUME_MAY_CHANGE = (
    "run_name",
    "trainer.max_steps",
    "trainer.num_epochs",
    "trainer.eval_every_steps",
    "trainer.save_every_steps",
    "trainer.keep_checkpoints",
    "trainer.num_threads",
    "trainer.device",
    "logger.",
    "resume",
    "overwrite",
    "debug",
    "output_root",
    "ref.cache_dir",
    "provenance.",
)


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


def run_files(run_dir: Path) -> list[Path]:
    """What runs wrote in `run_dir`: everything but Hydra's own files (`.hydra/`, its job log, rewritten by
    every command), the lock and earlier runs kept aside."""
    if not run_dir.is_dir():
        return []
    return [
        p
        for p in sorted(run_dir.iterdir())
        if p.name not in (".hydra", LOCK_FILE) and p.suffix != ".log" and not p.name.startswith(ASIDE_PREFIX)
    ]


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to clobber an earlier run unless told (`overwrite=true` replaces it, `resume=true` continues
    it with the same config), before anything is touched."""
    kept_aside = sorted(run_dir.glob(ASIDE_PREFIX + "*"))
    if cfg.resume:
        if (run_dir / "final").exists():
            raise ConfigError(f"{run_dir} finished already (final/ exists): nothing to resume")
        _check_same_config(cfg, run_dir)
    elif (run_files(run_dir) or kept_aside) and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run{f' (and {kept_aside[-1].name}/)' if kept_aside else ''}: pass "
            "resume=true to continue it, overwrite=true to replace it, or run_name=NAME for a new run dir"
        )


def _check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    """A resumed run continues the run of `config.yaml`: refuse any change but those of RESUME_MAY_CHANGE."""
    if not (run_dir / "config.yaml").is_file():
        return
    before = dict(_flat(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
    now = dict(_flat(stage_view(cfg)))  # config.yaml holds what the stage reads
    changed = [
        f"{key}={before.get(key, '(absent)')} (now {now.get(key, '(absent)')})"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and not _may_change_on_resume(key)
    ]
    if changed:
        allowed = ", ".join(key + "*" if key.endswith(".") else key for key in RESUME_MAY_CHANGE)
        raise ConfigError(
            f"resume=true: {run_dir} was run with {', '.join(changed)}; a resumed run keeps its config "
            f"(only {allowed} may change): pass the run's values, or start a new run with overwrite=true "
            "or run_name=NAME"
        )


def _may_change_on_resume(key: str) -> bool:
    return any(
        key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUME_MAY_CHANGE
    )


def _flat(node, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


@contextlib.contextmanager
def claimed(cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this run's whole life: one process at a time (a lock), nothing clobbered
    (`check_run_dir`), and with `overwrite=true` the earlier run moved aside into `.previous-<time>/`, put
    back if this run fails and removed once it finishes. Under DeepSpeed the process that launches the
    ranks holds it (rank 0 when a launcher started them); SIGTERM stops the run like an error would."""
    if os.environ.get(_HELD_ENV) or distributed.launcher_rank() != 0 or not distributed.first_node():
        yield
        return
    run_dir = Path(run_dir)
    with _locked(run_dir), _sigterm_raises(run_dir):
        check_run_dir(cfg, run_dir)
        os.environ[_HELD_ENV] = str(run_dir)
        try:
            with _kept_aside(run_dir) if cfg.overwrite else contextlib.nullcontext():
                yield
            if cfg.overwrite or cfg.resume:  # this run finished: earlier runs kept aside are done with
                for aside in run_dir.glob(ASIDE_PREFIX + "*"):
                    shutil.rmtree(aside)
        finally:
            del os.environ[_HELD_ENV]


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir} is in use by another dpo-run (it holds {run_dir / LOCK_FILE}): wait for it to "
                "end, or pass run_name=NAME for another run dir"
            ) from None
        yield  # the lock goes with the file's closing, also when the process dies


@contextlib.contextmanager
def _sigterm_raises(run_dir: Path) -> Iterator[None]:
    """SIGTERM (what Slurm and Kubernetes send before killing a job) raises RunStopped, so the run ends
    as after an error (an earlier run kept aside goes back); the training loop saves a checkpoint first."""

    def on_sigterm(signum, frame) -> None:
        resumable = latest_resumable(run_dir)
        raise RunStopped(
            "terminated (SIGTERM)"
            + (f"; continue from {resumable} with resume=true" if resumable else "; nothing to resume")
        )

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _kept_aside(run_dir: Path) -> Iterator[None]:
    """`overwrite=true`: the earlier run's files wait in `.previous-<time>/` while this run works. If this
    run fails with nothing to resume they go back; if it left a checkpoint they stay aside (resume=true
    finishes this run, and then removes them)."""
    earlier = run_files(run_dir)
    if not earlier:
        yield
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in earlier)
    aside = run_dir / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for path in earlier:
        os.replace(path, aside / path.name)
    print(
        f"overwrite: moved the earlier run ({names}) aside to {aside}; it is removed once this run finishes"
    )
    try:
        yield
    except BaseException:
        if latest_resumable(run_dir) is not None:
            print(f"overwrite: the earlier run stays in {aside} (this run can resume)")
            raise
        for path in run_files(run_dir):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in aside.iterdir():
            os.replace(path, run_dir / path.name)
        aside.rmdir()
        print(f"overwrite: this run failed; the earlier run is back in {run_dir}")
        raise
    shutil.rmtree(aside)


def requeued(run_dir: Path) -> bool:
    """A requeued submitit job: its run dir holds an unfinished run with a resumable checkpoint (a sweep's
    dir is new for every `dpo-run -m`, so only a requeue finds one), which it resumes."""
    return (
        "SUBMITIT_EXECUTOR" in os.environ
        and not (Path(run_dir) / "final").exists()
        and latest_resumable(Path(run_dir)) is not None
    )


def prepare(cfg: DictConfig, run_dir: Path) -> RunDir:
    """Make the run dir ready (`claimed` has checked it), then fix threads and seeds."""
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
    if not cfg.resume:
        return
    checkpoint = latest_resumable(run_dir)
    step = _step_of(checkpoint)
    print(f"resume: from {checkpoint} (step {step})" if checkpoint else f"resume: no checkpoint in {run_dir}")
    # Lines written after the checkpoint will be written again by the resumed run (all of them when there
    # is no checkpoint: it starts again at step 0); a line cut short by a kill is dropped.
    for log in (run_dir / "metrics.jsonl", run_dir / "samples.jsonl"):
        if log.exists():
            lines = log.read_text().splitlines(keepends=True)
            kept = [line.rstrip("\n") + "\n" for line in lines if checkpoint and _step_of_line(line) <= step]
            log.write_text("".join(kept))


def _step_of_line(line: str) -> float:
    """The step of a log line; infinity (dropped) for a line that a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


# The keys that say which records a model saw (the stage's own budgets, such as max_eval_examples, do not).
DATA_IDENTITY = ("name", "path", "eval_path", "hub_id", "max_records")


def data_identity(data: DictConfig | dict) -> dict:
    return {key: data.get(key) for key in DATA_IDENTITY if data.get(key) not in (None, "")}


def describe_data(data: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in data.items()) or "?"


def find_sft_checkpoint(cfg: DictConfig) -> Path:
    """`sft_checkpoint=`, else the newest SFT `final/` of this experiment trained from the same model
    preset on the same data (else on other data, said in one line): the policy init and reference of the
    preference stages, the reference of `eval`."""
    if cfg.sft_checkpoint:
        return check_weights(Path(cfg.sft_checkpoint), "sft_checkpoint")
    sft_root = Path(cfg.output_root) / cfg.exp_name / "sft"
    candidates = {
        final: OmegaConf.load(final.parent / "config.yaml")
        for final in sft_root.rglob("final")
        if (final / "config.json").is_file() and (final.parent / "config.yaml").is_file()
    }
    candidates = {final: c for final, c in candidates.items() if c.model.name == cfg.model.name}
    if not candidates:
        raise ConfigError(
            f"no SFT checkpoint for model={cfg.model.name} under {sft_root}: run `dpo-run sft"
            f"{'' if cfg.exp_name == 'default' else ' exp_name=' + cfg.exp_name} model={cfg.model.name}` "
            "first, or set sft_checkpoint=/path/to/checkpoint"
        )
    wanted = data_identity(cfg.data)
    same_data = [final for final, c in candidates.items() if data_identity(c.data) == wanted]
    newest = max(same_data or candidates, key=lambda p: p.stat().st_mtime)
    if not same_data:
        print(
            f"sft_checkpoint: no SFT run on data {describe_data(wanted)}; using {newest}, trained on data "
            f"{describe_data(data_identity(candidates[newest].data))} (set sft_checkpoint=PATH to choose)"
        )
    return check_weights(newest, "sft_checkpoint")


def model_provenance(path: Path | None, cfg: DictConfig) -> dict:
    """Where a model came from: its resolved path, a fingerprint of its files, and, for a run's `final/`
    or checkpoint, the data, stage and loss that trained it (from that run's config.yaml)."""
    from dpo_cli.reference import checkpoint_fingerprint

    if path is None:  # the preset itself: a hub id, a package's file or the random-init tiny model
        source = cfg.model.name_or_path or cfg.model.python_package or f"{cfg.model.name} (random init)"
        return {"path": source, "fingerprint": None, "trained_on": None}
    path = Path(path).resolve()
    run_config = next(
        (d / "config.yaml" for d in (path.parent, path.parent.parent) if (d / "config.yaml").is_file()), None
    )
    trained = None
    if run_config is not None:
        c = OmegaConf.load(run_config)
        trained = {
            "run_dir": str(run_config.parent),
            "stage": c.get("stage"),
            "loss": OmegaConf.select(c, "loss.name"),
            "data": data_identity(c.get("data") or {}),
        }
    return {"path": str(path), "fingerprint": checkpoint_fingerprint(path), "trained_on": trained}


def provenance(cfg: DictConfig, **models: Path | None) -> dict:
    """The `provenance` section of config.yaml (and the wandb config): each named model (policy_init,
    reference, sft_checkpoint, ...) described by `model_provenance`, and the data this run reads."""
    described: dict = {}  # a model named twice (DPO's policy init is its reference) is hashed once
    for path in models.values():
        key = None if path is None else Path(path).resolve()
        described[key] = described.get(key) or model_provenance(path, cfg)
    return {
        **{name: described[None if p is None else Path(p).resolve()] for name, p in models.items()},
        "data": data_identity(cfg.data),
    }


def in_sweep() -> bool:
    """Whether this run is a job of a `-m` sweep."""
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def finish(run_dir: Path, next_command: str, why: str, *, carry_overrides: bool = True) -> None:
    """Tell the user what the run wrote and what to run next (with the overrides that locate this run). A
    job of a sweep names no next command: the sweep's end does (dpo_cli/frontier.py)."""
    if not distributed.is_main():
        return
    written = ", ".join(
        sorted(
            p.name + ("/" if p.is_dir() else "")
            for p in run_dir.iterdir()
            if p.name[0] != "." and not (p.suffix == ".log" and p.stat().st_size == 0)
        )
    )
    print(f"\nwrote {run_dir}/: {written}")
    summary = closing_summary(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").is_file() else None
    if summary:
        print(summary)
    if in_sweep():
        return
    carried = ""
    if carry_overrides and HydraConfig.initialized():
        keep = ("exp_name", "model", "data", "output_root", "experiment")
        overrides = HydraConfig.get().overrides.task
        carried = "".join(
            f" {shlex.quote(o)}" for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in keep
        )
    print(f"next: {next_command}{carried}   ({why})")
