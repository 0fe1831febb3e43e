"""Where the model's weights, gradients and optimizer live: one process, or DeepSpeed ZeRO across ranks.

The loop (`loop.py`) sees one small interface, so that another engine (or a PEFT-wrapped model) is one more
class here and no branch there:

    module                 what forward passes call (the model, or the DeepSpeed engine around it)
    backward(loss)         accumulate this micro-batch's gradients
    lr()                   the learning rate of the step in flight
    autocast()             the context forward passes run in (trainer.precision=*-mixed: autocast)
    step(apply) -> norm    clip, then update (when `apply`); the gradient norm before clipping
    overflowed             whether that step's gradients overflowed the fp16 loss scale (it was
                           skipped and the scale lowered: the normal start of a 16-mixed run, no error)
    save(path, state)      a resumable checkpoint: weights (an adapter's only), optimizer, schedule, RNG,
                           plus the loop's `state`
    load(path, state)      restore one, given its trainer state
    save_final(path)       the full weights as a Hugging Face model dir (`final/`); a PEFT model's merged
                           into the base `load_base()` gives, with the adapter in `final/adapter/`
    frozen(cfg, model, device)   (class method) a frozen reference model placed as this backend places it

Under DeepSpeed the same loop runs on every rank (dpo_cli/distributed.py starts them): each rank trains on
its share of every global batch, and DeepSpeed averages the gradients, clips and steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli import adapters, distributed, lean
from dpo_cli.checkpoints import (
    load_deepspeed_resumable,
    load_trained_weights,
    restore_rng,
    rng_state,
    save_deepspeed_resumable,
    save_model,
    save_resumable,
    write_atomically,
)
from dpo_cli.errors import ConfigError
from dpo_cli.optim import make_optimizer, schedule

# trainer.precision -> the dtype forward passes compute in under autocast (None: no autocast).
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def prepare_model(t: DictConfig, model: PreTrainedModel) -> None:
    """What both backends do to the model before training: the weights' dtype of trainer.precision and
    gradient checkpointing."""
    if t.precision == "bf16-true":  # (loaded in bf16 already by a stage: validate sets model.dtype)
        model.to(torch.bfloat16)
    if t.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (a LoRA base) and with ZeRO-3's gathered parameters.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class SingleProcess:
    """One process on one device (CPU or one GPU): torch's optimizer, clipping, schedule and autocast (with
    a GradScaler for fp16)."""

    # A non-finite batch can be dropped here (`trainer.nan_policy=skip_batch`); see DeepSpeed.
    can_skip_batches = True

    def __init__(
        self,
        cfg: DictConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        load_base: Callable[[], PreTrainedModel] | None = None,
        num_steps: int | None = None,
    ):
        """`num_steps`: the run's optimizer steps (a decaying schedule or a warm-up ratio needs them)."""
        t = cfg.trainer
        prepare_model(t, model)
        # autocast casts inside transformers' modules, which the lean layers' own backward would not replay.
        mixed = t.precision in AUTOCAST_DTYPES
        if not mixed and lean.wanted(t.lean_memory, model, checkpointing=t.gradient_checkpointing):
            lean.apply(model, trim_heap=t.heap_trim and device.type == "cpu")
        self.module, self.tokenizer, self.load_base = model, tokenizer, load_base
        self.accumulation_steps = t.batch_size_examples // t.microbatch_size_examples
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(t, self.params, cfg.lr)
        self.scheduler = schedule(t, self.optimizer, num_steps)
        self.autocast_dtype, self.device_type = AUTOCAST_DTYPES.get(t.precision), device.type
        # fp16's 5 exponent bits underflow small gradients: scale the loss up, and unscale before clipping.
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "16-mixed")
        self.overflowed = False
        self.max_grad_norm = float("inf") if t.max_grad_norm is None else t.max_grad_norm
        # A NaN bound (validation bypassed) turns every clipped gradient NaN while the norm stays finite.
        self.bound_is_a_number = not math.isnan(self.max_grad_norm)

    @classmethod
    def frozen(cls, cfg: DictConfig, model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
        return model.to(device).eval().requires_grad_(False)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulation_steps).backward()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, apply: bool) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)  # (a disabled scaler does nothing here, nor below)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.overflowed = self.scaler.is_enabled() and not bool(torch.isfinite(grad_norm))
        if apply and torch.isfinite(grad_norm) and self.bound_is_a_number:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
        self.scaler.update()  # a lower scale after an overflow, a higher one after enough good steps
        # Free the gradients now: the next forward needs the memory.
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, path: Path, state: dict[str, Any]) -> None:
        state = state | {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }
        save_resumable(self.module, self.tokenizer, path, state)

    def load(self, path: Path, state: dict[str, Any]) -> None:
        load_trained_weights(self.module, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])

    def save_final(self, path: Path) -> Path:
        if adapters.is_adapted(self.module):
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.module)
            return write_atomically(
                path, adapters.merged_writer(self.module, state, self.tokenizer, self.load_base)
            )
        return save_model(self.module, self.tokenizer, path)


class DeepSpeed:
    """DeepSpeed ZeRO (stage `trainer.zero_stage`) across the ranks, with our optimizer and schedule unless
    trainer.deepspeed_config brings DeepSpeed's own; mixed precision is its bf16 / fp16 sections."""

    # Every rank must take the same branch; a non-finite loss stops them all (config.py enforces it).
    can_skip_batches = False

    def __init__(
        self,
        cfg: DictConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        load_base: Callable[[], PreTrainedModel] | None = None,
        num_steps: int | None = None,
    ):
        import deepspeed

        t = cfg.trainer
        prepare_model(t, model)  # (the lean layers call F.linear past ZeRO-3's gathering hooks: not here)
        config = deepspeed_config(cfg, device)
        params = [p for p in model.parameters() if p.requires_grad]
        offload = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "cpu"
        optimizer = None if "optimizer" in config else make_optimizer(t, params, cfg.lr, offload=offload)
        # A callable: DeepSpeed hands it the optimizer it ends up with.
        scheduler = None if "scheduler" in config else functools.partial(schedule, t, num_steps=num_steps)
        self.module, *_ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.tokenizer, self.load_base = tokenizer, load_base
        self.fp16 = config.get("fp16", {}).get("enabled", False)
        self.overflowed = False
        # Micro-batches per optimizer step on this rank, as the data shards them (data.batches).
        self.accumulation_steps = t.batch_size_examples // (
            t.microbatch_size_examples * distributed.world_size()
        )
        if (
            self.module.train_batch_size() != t.batch_size_examples
            or self.module.gradient_accumulation_steps() != self.accumulation_steps
        ):
            raise ConfigError(
                f"trainer.deepspeed_config gives train_batch_size={self.module.train_batch_size()} and "
                f"train_micro_batch_size_per_gpu={self.module.train_micro_batch_size_per_gpu()}, but "
                f"trainer.batch_size_examples={t.batch_size_examples} and trainer.microbatch_size_examples="
                f"{t.microbatch_size_examples}; make them agree"
            )

    @classmethod
    def frozen(cls, cfg: DictConfig, model: PreTrainedModel, device: torch.device):
        """Under ZeRO-3, sharded over the ranks like the policy (a DeepSpeed engine without optimizer,
        whose forward passes every rank runs together)."""
        model.to(device).eval().requires_grad_(False)
        config = deepspeed_config(cfg, device)
        if config["zero_optimization"]["stage"] != 3:
            # Under bf16 / fp16 DeepSpeed computes with a bf16 / fp16 copy of the policy; so does its
            # reference.
            if config.get("bf16", {}).get("enabled"):
                return model.to(torch.bfloat16)
            return model.half() if config.get("fp16", {}).get("enabled") else model
        import deepspeed

        reference, *_ = deepspeed.initialize(model=model, config=distributed.reference_config(config))
        reference.eval()  # DeepSpeedEngine.eval() returns None
        return reference

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales the loss by 1/accumulation steps, and steps (averaging the gradients over the
        # ranks, clipping, the warm-up) at the last micro-batch of each optimizer step.
        self.module.backward(loss)
        self.module.step()

    def lr(self) -> float:
        return self.module.get_lr()[0]

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds the bf16 / fp16 weights itself

    def step(self, apply: bool) -> torch.Tensor:
        # DeepSpeed's fp16 loss scaler skips a step whose gradients overflowed, as torch's does.
        self.overflowed = self.fp16 and not self.module.was_step_applied()
        return torch.tensor(float(self.module.get_global_grad_norm()))  # the same on every rank

    def save(self, path: Path, state: dict[str, Any]) -> None:
        save_deepspeed_resumable(self.module, path, state)

    def load(self, path: Path, state: dict[str, Any]) -> None:
        load_deepspeed_resumable(self.module, path)

    def save_final(self, path: Path) -> Path:
        state_dict = _full_state_dict(self.module)
        if distributed.is_main() and adapters.is_adapted(self.module):
            from peft import get_peft_model_state_dict

            adapter_state = get_peft_model_state_dict(self.module.module, state_dict=state_dict)
            write_atomically(
                path, adapters.merged_writer(self.module, adapter_state, self.tokenizer, self.load_base)
            )
        elif distributed.is_main():
            save_model(self.module.module, self.tokenizer, path, state_dict)
        distributed.barrier()
        return path


def backend_class(cfg: DictConfig) -> type[SingleProcess] | type[DeepSpeed]:
    """The backend of this stage: DeepSpeed for training stages with trainer.engine=deepspeed."""
    return DeepSpeed if distributed.wanted(cfg) else SingleProcess


def deepspeed_config(cfg: DictConfig, device: torch.device) -> dict:
    world, cuda = distributed.world_size(), device.type == "cuda"
    return distributed.deepspeed_config(cfg.trainer, world=world, cuda=cuda)


def _full_state_dict(ds_engine) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights on CPU on rank 0 (None on the others), gathered from the ZeRO shards (the
    optimizer's fp32 master copy). A collective: every rank calls it."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    module = ds_engine.module
    main = distributed.is_main()
    gathered: dict[int, torch.Tensor | None] = {}
    state: dict[str, torch.Tensor] = {}
    # Tied weights (embeddings / LM head) appear under both names and are gathered once.
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in gathered:
            full = safe_get_full_fp32_param(param)
            if full is None:  # not trained: no fp32 master copy, but ZeRO-3 may still shard it
                with zero.GatheredParameters([param]):
                    full = param.detach().float().clone()
            gathered[id(param)] = full.cpu() if main else None
        state[name] = gathered[id(param)]
    if not main:
        return None
    persistent = module.state_dict().keys()
    state |= {name: b.cpu() for name, b in module.named_buffers() if name in persistent}
    return state
