"""The training loop shared by every stage: optimizer, warm-up, accumulation, clipping, eval, checkpoints.

A stage hands over a model, tokenized examples and `loss_fn(model, batch) -> (loss, metrics)`; metrics are
per-batch means (floats) that the loop averages over micro-batches weighted by examples.

With `trainer.engine=deepspeed` the same loop runs on every rank (dpo_cli/distributed.py starts them): the
model is a DeepSpeed ZeRO engine, each rank trains on its share of every global batch (the same examples
per optimizer step as one process), and DeepSpeed averages the gradients, clips and steps.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
import shutil
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli import distributed, lean
from dpo_cli.checkpoints import (
    TRAINER_STATE,
    keep_newest,
    latest_resumable,
    load_deepspeed_resumable,
    restore_rng,
    rng_state,
    save_deepspeed_resumable,
    save_model,
    save_resumable,
)
from dpo_cli.data.batches import Batch, RefTable, TokenizedExample, batch_order, train_batches
from dpo_cli.errors import ConfigError, RunStopped
from dpo_cli.evaluate import FrontierEvaluator
from dpo_cli.logging import RunLogger
from dpo_cli.models import resolve_device
from dpo_cli.optim import make_optimizer, optimizer_and_schedule, warmup

CONSOLE_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "reward", "reward_delta", "kl")
LossFn = Callable[[PreTrainedModel, Batch], tuple[torch.Tensor, dict[str, float]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


RUN_FILES = ("metrics.jsonl", "samples.jsonl", "final", "checkpoints", "wandb", "wandb_run_id")


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


def prepare_run(cfg: DictConfig, run_dir: Path) -> torch.device:
    """Make the run dir ready without losing anything (`check_run_dir`), then fix threads and seeds.
    Under DeepSpeed rank 0 alone touches the run dir while the other ranks wait."""
    if distributed.is_main():
        _prepare_run_dir(cfg, run_dir)
    distributed.barrier()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda" and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    return device


def _prepare_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    previous = check_run_dir(cfg, run_dir)
    if cfg.resume:
        checkpoint = latest_resumable(run_dir)
        step = torch.load(checkpoint / TRAINER_STATE, weights_only=False)["step"] if checkpoint else 0
        print(
            f"resume: from {checkpoint} (step {step})"
            if checkpoint
            else f"resume: no checkpoint in {run_dir}"
        )
        # Lines written after the checkpoint will be written again by the resumed run.
        for log in (run_dir / "metrics.jsonl", run_dir / "samples.jsonl"):
            if log.exists():
                kept = [
                    line
                    for line in log.read_text().splitlines(keepends=True)
                    if json.loads(line)["step"] <= step
                ]
                log.write_text("".join(kept))
    else:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


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


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def total_steps(t: DictConfig, num_examples: int) -> int:
    """Optimizer steps of the run: trainer.max_steps, else trainer.num_epochs epochs."""
    steps_per_epoch = num_examples // t.batch_size_examples
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{num_examples} training examples cannot fill one batch of "
            f"trainer.batch_size_examples={t.batch_size_examples}"
        )
    return t.max_steps or t.num_epochs * steps_per_epoch


def visited_examples(examples: list[TokenizedExample], cfg: DictConfig) -> list[TokenizedExample]:
    """The training examples a run of `cfg` will see, in its data order (all ranks together)."""
    t = cfg.trainer
    microbatches = total_steps(t, len(examples)) * (t.batch_size_examples // t.microbatch_size_examples)
    order = batch_order(examples, t.microbatch_size_examples, seed=cfg.seed, by_prompt=t.batch_by_prompt)
    return [examples[i] for ids in itertools.islice(order, microbatches) for i in ids]


def mean_metrics(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    total = sum(n for n, _ in parts)
    sums: dict[str, float] = defaultdict(float)
    for n, metrics in parts:
        for k, v in metrics.items():
            sums[k] += v * n
    return {k: v / total for k, v in sums.items()}


@torch.no_grad()
def evaluate(model: PreTrainedModel, batches: list[Batch], loss_fn: LossFn, device: torch.device) -> dict:
    """Held-out loss and metrics of the stage's objective."""
    model.eval()
    parts = []
    for batch in tqdm(batches, desc="eval", unit="batch", leave=False):
        loss, metrics = loss_fn(model, to_device(batch, device))
        parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
    return {f"eval/{k}": v for k, v in mean_metrics(parts).items()}


def eval_point(
    model: PreTrainedModel,
    step: int,
    batches: list[Batch],
    loss_fn: LossFn,
    frontier: FrontierEvaluator | None,
    logger: RunLogger,
    device: torch.device,
) -> dict[str, float]:
    """One eval point: held-out objective metrics (given, or computed), plus a (KL, reward) frontier point
    when sampling is on."""
    metrics = evaluate(model, batches, loss_fn, device)
    if frontier is not None:
        frontier_metrics, rows = frontier(model, step)
        metrics |= frontier_metrics
        logger.log_samples(rows, step)
    logger.log(metrics, step=step)
    return metrics


class _Interrupt:
    requested = False


@contextlib.contextmanager
def _interruptible() -> Iterator[_Interrupt]:
    state = _Interrupt()

    def on_sigint(signum, frame) -> None:
        if state.requested:
            raise KeyboardInterrupt
        state.requested = True
        print("\ndpo-run: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def deepspeed_config(cfg: DictConfig, device: torch.device) -> dict:
    return distributed.deepspeed_config(
        cfg.trainer, world=distributed.world_size(), bf16=device.type == "cuda"
    )


def frozen_reference(cfg: DictConfig, model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """The frozen reference model on `device`; under ZeRO-3, sharded over the ranks like the policy (a
    DeepSpeed engine without optimizer, whose forward passes every rank runs together)."""
    model.to(device).eval().requires_grad_(False)
    if not distributed.wanted(cfg):
        return model
    config = deepspeed_config(cfg, device)
    if config["zero_optimization"]["stage"] != 3:
        # The policy computes in bf16 on GPUs (DeepSpeed casts it); so does its reference.
        return model.to(torch.bfloat16) if config.get("bf16", {}).get("enabled") else model
    import deepspeed

    reference, *_ = deepspeed.initialize(model=model, config=distributed.reference_config(config))
    reference.eval()  # DeepSpeedEngine.eval() returns None
    return reference


def _deepspeed_engine(cfg: DictConfig, model: PreTrainedModel, device: torch.device):
    """`model` wrapped in a DeepSpeed ZeRO engine with our optimizer and warm-up (unless
    trainer.deepspeed_config brings DeepSpeed's own)."""
    import deepspeed

    t = cfg.trainer
    config = deepspeed_config(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    offload = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "cpu"
    optimizer = None if "optimizer" in config else make_optimizer(t, params, cfg.lr, offload=offload)
    # A callable: DeepSpeed hands it the optimizer it ends up with.
    scheduler = None if "scheduler" in config else functools.partial(LambdaLR, lr_lambda=warmup(t))
    ds_engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    if ds_engine.train_batch_size() != t.batch_size_examples:
        raise ConfigError(
            f"trainer.deepspeed_config gives train_batch_size={ds_engine.train_batch_size()}, but "
            f"trainer.batch_size_examples={t.batch_size_examples}; make them agree"
        )
    return ds_engine


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


def train(
    cfg: DictConfig,
    run_dir: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: list[TokenizedExample],
    eval_batches: list[Batch],
    loss_fn: LossFn,
    frontier: FrontierEvaluator | None,
    logger: RunLogger,
    device: torch.device,
    ref_logps: RefTable | None = None,
    share_prompts: bool = False,
) -> Path:
    """Train `model` in place; returns the `final/` checkpoint dir. `ref_logps` (precomputed reference
    log-probs by sequence) go into every training batch, and with `share_prompts` the batches carry their
    shared-prompt layout (`data.batches.collate`)."""
    t = cfg.trainer
    ds = distributed.wanted(cfg)
    accumulation_steps = t.batch_size_examples // t.microbatch_size_examples
    num_steps = total_steps(t, len(train_examples))

    microbatch_size, world = t.microbatch_size_examples, distributed.world_size()
    if ds:
        # From here on `model` is the DeepSpeed engine: forward, backward and step go through it.
        model = _deepspeed_engine(cfg, model, device)
        accumulation_steps = model.gradient_accumulation_steps()  # per rank
        microbatch_size = model.train_micro_batch_size_per_gpu()
    else:
        if lean.wanted(t.lean_memory, model):
            lean.apply(model, trim_heap=t.heap_trim and device.type == "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_schedule(t, params, cfg.lr)

    start_step = 0
    resume_from = latest_resumable(run_dir) if cfg.resume else None
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE, weights_only=False)
        written_by = (state.get("engine", "single"), state.get("world_size", 1))
        if written_by != (t.engine, world):
            raise ConfigError(
                f"{resume_from} was written by trainer.engine={written_by[0]} with {written_by[1]} rank(s); "
                f"resume with the same trainer and number of ranks (now {t.engine}, {world})"
            )
        if ds:
            load_deepspeed_resumable(model, resume_from)
        else:
            model.load_state_dict(type(model).from_pretrained(resume_from).state_dict())
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_rng(state["rng"])
        if frontier is not None:
            frontier.first_prompt_rewards = state["frontier_first_prompt_rewards"]
        start_step = state["step"]
    else:
        eval_point(model, 0, eval_batches, loss_fn, frontier, logger, device)

    def save(step: int) -> Path:
        state = {
            "step": step,
            "engine": t.engine,
            "world_size": world,
            "frontier_first_prompt_rewards": frontier.first_prompt_rewards if frontier else None,
        }
        path = run_dir / "checkpoints" / f"step-{step}"
        if ds:
            save_deepspeed_resumable(model, path, state)
        else:
            state |= {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            }
            save_resumable(model, tokenizer, path, state)
        if distributed.is_main():
            keep_newest(run_dir, t.keep_checkpoints)
        return path

    def non_finite(what: str, batch: Batch, *, step: int) -> None:
        if t.nan_policy == "skip_batch":
            return
        example_ids = [i for ids in distributed.gather(batch["example_ids"].tolist()) for i in ids]
        prompts = sorted({tokenizer.decode(train_examples[i].prompt_ids) for i in example_ids})
        last_good = latest_resumable(run_dir) or "none (set trainer.save_every_steps)"
        raise RunStopped(
            f"step {step}: {what} is not finite on training examples {example_ids} "
            f"(prompts {prompts[:3]}); last good checkpoint: {last_good}; "
            + (
                "DeepSpeed runs stop on it"
                if ds
                else "trainer.nan_policy=skip_batch drops such batches instead"
            )
        )

    batches = train_batches(
        train_examples,
        microbatch_size,
        tokenizer.pad_token_id,
        seed=cfg.seed,
        by_prompt=t.batch_by_prompt,
        skip=start_step * accumulation_steps * world,
        rank=distributed.rank(),
        world_size=world,
        ref_logps=ref_logps,
        share_prompts=share_prompts,
    )
    skipped_batches = 0
    progress = tqdm(
        range(start_step + 1, num_steps + 1),
        desc=f"{cfg.stage} ({cfg.loss.name})",
        unit="step",
        initial=start_step,
        total=num_steps,
    )
    # Ctrl-C finishes the step in flight, saves a resumable checkpoint and stops (twice: stop at once).
    with _interruptible() as interrupted:
        for step in progress:
            model.train()
            started = time.perf_counter()
            if ds:
                lr = model.get_lr()[0]
                parts, grad_norm = _deepspeed_step(
                    model,
                    batches,
                    accumulation_steps,
                    loss_fn,
                    device,
                    functools.partial(non_finite, step=step),
                )
                train_metrics = distributed.mean_over_ranks(parts)
            else:
                parts, finite = [], True
                for _ in range(accumulation_steps):
                    batch = to_device(next(batches), device)
                    loss, metrics = loss_fn(model, batch)
                    if not torch.isfinite(loss):
                        non_finite("the loss", batch, step=step)
                        finite = False
                        continue
                    (loss / accumulation_steps).backward()
                    parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                if finite and not torch.isfinite(grad_norm):
                    non_finite("the gradient norm", batch, step=step)
                    finite = False
                lr = scheduler.get_last_lr()[0]
                if finite:
                    optimizer.step()
                    scheduler.step()
                else:
                    skipped_batches += 1
                # Free the gradients now: the next forward needs the memory.
                optimizer.zero_grad(set_to_none=True)
                train_metrics = mean_metrics(parts) if parts else {}

            progress.set_postfix(
                {k: f"{v:.3f}" for k, v in train_metrics.items() if k in ("loss", "rewards/accuracies")}
            )
            if step % cfg.logger.log_every_steps == 0 or step == num_steps:
                elapsed = time.perf_counter() - started
                logged = {f"train/{k}": v for k, v in train_metrics.items()}
                logged |= {
                    "train/grad_norm": grad_norm.item(),
                    "train/lr": lr,
                    "train/examples_per_second": t.batch_size_examples / elapsed,
                    "train/examples": step * t.batch_size_examples,
                }
                if t.nan_policy == "skip_batch":
                    logged["train/skipped_batches"] = skipped_batches
                logger.log(logged, step=step)
            if step % t.eval_every_steps == 0 or step == num_steps:
                eval_metrics = eval_point(model, step, eval_batches, loss_fn, frontier, logger, device)
                shown = {k: v for k, v in eval_metrics.items() if k.split("/", 1)[1] in CONSOLE_METRICS}
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
            if t.save_every_steps and step % t.save_every_steps == 0 and step != num_steps:
                save(step)
            # Under DeepSpeed every rank must stop at the same step (the save above is a collective).
            if distributed.any_true(interrupted.requested) if ds else interrupted.requested:
                kept = save(step)
                raise RunStopped(f"interrupted: saved {kept} (step {step}); continue with resume=true")

    if ds:
        state_dict = _full_state_dict(model)
        final = run_dir / "final"
        if distributed.is_main():
            save_model(model.module, tokenizer, final, state_dict)
        distributed.barrier()
        return final
    return save_model(model, tokenizer, run_dir / "final")


def _deepspeed_step(
    ds_engine,
    batches: Iterator[Batch],
    accumulation_steps: int,
    loss_fn: LossFn,
    device: torch.device,
    non_finite,
) -> tuple[list[tuple[int, dict[str, float]]], torch.Tensor]:
    """One optimizer step on this rank's micro-batches; DeepSpeed scales each loss by 1/accumulation_steps,
    averages the gradients over the ranks, clips and steps (with the warm-up) on the last micro-batch."""
    parts = []
    for _ in range(accumulation_steps):
        batch = to_device(next(batches), device)
        loss, metrics = loss_fn(ds_engine, batch)
        if not distributed.all_true(bool(torch.isfinite(loss))):  # every rank stops, or none
            non_finite("the loss", batch)
        ds_engine.backward(loss)
        ds_engine.step()
        parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
    grad_norm = torch.tensor(float(ds_engine.get_global_grad_norm()))
    if not torch.isfinite(grad_norm):  # the same norm on every rank
        non_finite("the gradient norm", batch)
    return parts, grad_norm
