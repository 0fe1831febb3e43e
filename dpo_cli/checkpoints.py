"""Checkpoints: HF-format model dirs written atomically, plus the trainer state that makes a run resumable.

Every checkpoint is written into `.tmp-<name>` beside its target, fsynced, then renamed into place: a crash
or a kill mid-write leaves the previous checkpoint untouched and a `.tmp-*` dir that nothing ever loads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers.modeling_utils
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli import adapters, distributed
from dpo_cli.errors import ConfigError, RunStopped

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


def _fresh_tmp(path: Path) -> Path:
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, path: Path) -> Path:
    _fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself is durable only once its directory is synced
    return path


@contextlib.contextmanager
def _stop_if_disk_full(path: Path, partial: Path) -> Iterator[None]:
    """A full disk while writing `path` stops the run with one line, `partial` (the tmp file or dir)
    removed; any other error passes through."""
    try:
        yield
    except Exception as err:
        # safetensors reports ENOSPC as its own error type, with the OS message in the text.
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        if not (full or "No space left on device" in str(err)):
            raise
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise RunStopped(
            f"no space left on the device while writing {path}; the partial write was removed and earlier "
            "checkpoints are untouched: free space, then rerun (resume=true continues from the last one)"
        ) from err


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)`, make it durable, then rename it to `path` (replacing an older `path`).
    A full disk stops the run with one line; the partial write is removed, older checkpoints stay."""
    tmp = _fresh_tmp(path)
    with _stop_if_disk_full(path, tmp):
        write(tmp)
    return _commit(tmp, path)


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; once the block ends, it is fsynced and renamed to `path`
    (readers see all of it or nothing), or removed if the block fails. Its name is unique (mkstemp), so it
    never clobbers a file of the user's nor another process writing the same `path`; a full disk stops
    the run as in `write_atomically`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        with _stop_if_disk_full(path, tmp):
            yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def torch_save_atomically(obj: Any, path: Path) -> Path:
    """torch.save to `path` through `replaced_atomically`."""
    with replaced_atomically(path) as tmp:
        torch.save(obj, tmp)
    return path


@contextlib.contextmanager
def _without_deepspeed_probe(model: PreTrainedModel) -> Iterator[None]:
    """save_pretrained first unwraps distributed containers through accelerate, which imports DeepSpeed
    whenever it is installed only to test isinstance(model, DeepSpeedEngine): 0.3 s of a run's end, a
    third of a tiny model's whole DPO epoch. A plain PreTrainedModel in a process that never imported
    DeepSpeed cannot be such an engine, so there is nothing to unwrap."""
    if "deepspeed" in sys.modules or not isinstance(model, PreTrainedModel):
        yield
        return
    unwrap = transformers.modeling_utils.unwrap_model
    transformers.modeling_utils.unwrap_model = lambda module, recursive=False: module
    try:
        yield
    finally:
        transformers.modeling_utils.unwrap_model = unwrap


def _save_pretrained(model: PreTrainedModel, path: Path, **kwargs: Any) -> None:
    with _without_deepspeed_probe(model):
        model.save_pretrained(path, **kwargs)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A `save_pretrained` model + tokenizer dir, loadable by `AutoModelForCausalLM.from_pretrained`
    (`state_dict`: these weights instead of the model's own, e.g. gathered from ZeRO shards)."""

    if hasattr(model, "value_head"):
        # PPO's value head trains and is checkpointed with the policy; final/ is the policy alone.
        state_dict = model.state_dict() if state_dict is None else state_dict
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("value_head.")}

    def write(tmp: Path) -> None:
        _save_pretrained(model, tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    return write_atomically(path, write)


def save_resumable(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, state: dict[str, Any]
) -> Path:
    """A model dir plus `trainer_state.pt` (optimizer, scheduler, RNG, data position, step)."""

    def write(tmp: Path) -> None:
        _save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / TRAINER_STATE)

    return write_atomically(path, write)


def load_trained_weights(model: torch.nn.Module, path: Path) -> None:
    """Put a `save_resumable` dir's weights into `model` in place: the whole model, or for a PEFT model
    (whose resumable checkpoints hold only the adapter) the adapter."""
    if adapters.is_adapted(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        state = type(model).from_pretrained(path).state_dict()
        # Modules a stage adds to the model (PPO's value head) are saved with it but unknown to its class.
        added = model.state_dict().keys() - state.keys()
        if added:
            from safetensors.torch import load_file

            state |= {k: v for k, v in load_file(path / "model.safetensors").items() if k in added}
        model.load_state_dict(state)


def save_deepspeed_resumable(ds_engine: Any, path: Path, state: dict[str, Any]) -> Path:
    """DeepSpeed's own checkpoint (every rank writes its shards; a collective) plus each rank's RNG state,
    then `trainer_state.pt`; rank 0 renames it into place once every rank has written, as above."""
    tmp = path.with_name(f".tmp-{path.name}")
    if distributed.is_main():
        _fresh_tmp(path)
    distributed.barrier()
    # A PEFT model's frozen base is the checkpoint it started from: only the adapter is saved.
    frozen = adapters.is_adapted(ds_engine)
    ds_engine.save_checkpoint(
        str(tmp.parent), tag=tmp.name, save_latest=False, exclude_frozen_parameters=frozen
    )
    torch.save(rng_state(), tmp / f"rng-rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        torch.save(state, tmp / TRAINER_STATE)
        _commit(tmp, path)
    distributed.barrier()
    return path


def load_deepspeed_resumable(ds_engine: Any, path: Path) -> None:
    """Model shards, optimizer and scheduler state of a `save_deepspeed_resumable` dir; this rank's RNG."""
    ds_engine.load_checkpoint(
        str(path.parent), tag=path.name, load_module_strict=not adapters.is_adapted(ds_engine)
    )
    restore_rng(torch.load(path / f"rng-rank{distributed.rank()}.pt", weights_only=False))


def check_weights(path: Path, key: str) -> Path:
    """`path` (given as `key=`) when its weights are whole: a model dir (config.json) must hold weights,
    and each safetensors file as many bytes as its header says. Checked before loading, so that a missing
    or cut-short file is named in one line instead of a loader's traceback (or a hint about the hub)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return path  # not a model dir at all: load_model says so
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("pytorch_model*.bin")):
        raise ConfigError(f"{key}={path}: config.json but no weights (model.safetensors) in it")
    for file in weights:
        size = file.stat().st_size
        try:
            with file.open("rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_size)) if 8 + header_size <= size else {}
            data_size = max(t["data_offsets"][1] for name, t in header.items() if name != "__metadata__")
        except (ValueError, KeyError, TypeError, IndexError):  # no header, not JSON, no tensors
            data_size = None
        if data_size is None or 8 + header_size + data_size != size:
            raise ConfigError(
                f"{key}={path}: {file.name} is truncated or damaged ({size} bytes); write it again (rerun "
                "the stage that made it) or point at another checkpoint"
            )
    return path


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
