"""Checkpoints: HF-format model dirs written atomically, plus the trainer state that makes a run resumable.

Every checkpoint is written into `.tmp-<name>` beside its target, fsynced, then renamed into place: a crash
or a kill mid-write leaves the previous checkpoint untouched and a `.tmp-*` dir that nothing ever loads.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        _fsync(path)


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)`, make it durable, then rename it to `path` (replacing an older `path`)."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself is durable only once its directory is synced
    return path


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """A `save_pretrained` model + tokenizer dir, loadable by `AutoModelForCausalLM.from_pretrained`."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_atomically(path, write)


def save_resumable(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, state: dict[str, Any]
) -> Path:
    """A model dir plus `trainer_state.pt` (optimizer, scheduler, RNG, data position, step)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / TRAINER_STATE)

    return write_atomically(path, write)


def resumable_checkpoints(run_dir: Path) -> list[Path]:
    """Complete `checkpoints/step-N` dirs of a run, oldest first (`.tmp-*` dirs are never listed)."""
    found = [
        (int(match.group(1)), p)
        for p in (Path(run_dir) / "checkpoints").glob("step-*")
        if (match := _STEP_DIR.fullmatch(p.name)) and (p / TRAINER_STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_resumable(run_dir: Path) -> Path | None:
    checkpoints = resumable_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def keep_newest(run_dir: Path, keep: int) -> None:
    for old in resumable_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
