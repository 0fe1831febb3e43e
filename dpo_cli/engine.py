"""The training loop shared by every stage: optimizer, warm-up, accumulation, clipping, eval, checkpoints.

A stage hands over a model, tokenized examples and `loss_fn(model, batch) -> (loss, metrics)`; metrics are
per-batch means (floats) that the loop averages over micro-batches weighted by examples.
"""

from __future__ import annotations

import contextlib
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
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli.checkpoints import (
    TRAINER_STATE,
    keep_newest,
    latest_resumable,
    restore_rng,
    rng_state,
    save_model,
    save_resumable,
)
from dpo_cli.config import ConfigError, RunStopped
from dpo_cli.data.batches import TokenizedExample, collate
from dpo_cli.evaluate import FrontierEvaluator
from dpo_cli.logging import RunLogger
from dpo_cli.models import resolve_device

Batch = dict[str, torch.Tensor]
CONSOLE_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "reward", "reward_delta", "kl")
LossFn = Callable[[PreTrainedModel, Batch], tuple[torch.Tensor, dict[str, float]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


RUN_FILES = ("metrics.jsonl", "samples.jsonl", "final", "checkpoints", "wandb", "wandb_run_id")


def prepare_run(cfg: DictConfig, run_dir: Path) -> torch.device:
    """Make the run dir ready without losing anything: refuse to clobber an earlier run unless told
    (`overwrite=true` replaces it, `resume=true` continues it), then fix threads and seeds."""
    previous = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if cfg.resume:
        if (run_dir / "final").exists():
            raise ConfigError(f"{run_dir} finished already (final/ exists): nothing to resume")
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
    elif previous and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run: pass resume=true to continue it, overwrite=true to replace it, "
            "or run_name=NAME for a new run dir"
        )
    elif previous:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed)
    return resolve_device(cfg.trainer.device)


def finish(run_dir: Path, next_command: str, why: str, *, carry_overrides: bool = True) -> None:
    """Tell the user what the run wrote and what to run next (with the overrides that locate this run)."""
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


def make_batches(examples: list[TokenizedExample], batch_size: int, pad_token_id: int) -> list[Batch]:
    """Fixed, in-order batches (eval): the same examples in the same batches at every eval point."""
    return [collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def train_batches(
    examples: list[TokenizedExample],
    microbatch_size: int,
    pad_token_id: int,
    *,
    seed: int,
    by_prompt: bool,
    skip: int = 0,
) -> Iterator[Batch]:
    """Endless shuffled micro-batches, epoch after epoch; the last partial micro-batch of an epoch is dropped.

    With `by_prompt`, prompts are shuffled and each prompt's examples stay adjacent, so the pairs of one
    prompt share a batch and their common completions are scored once (the paper's App. B batching).
    The order depends on `seed` alone; `skip` drops that many micro-batches without building them (resume).
    Each batch carries `example_ids`, its examples' indices, to name them when something goes wrong.
    """
    generator = torch.Generator().manual_seed(seed)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        groups[example.prompt_ids if by_prompt else (i,)].append(i)
    members = list(groups.values())
    while True:
        order = [i for g in torch.randperm(len(members), generator=generator).tolist() for i in members[g]]
        for start in range(0, len(order) - microbatch_size + 1, microbatch_size):
            if skip > 0:
                skip -= 1
                continue
            ids = order[start : start + microbatch_size]
            yield collate([examples[i] for i in ids], pad_token_id) | {"example_ids": torch.tensor(ids)}


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
    held_out_metrics: dict[str, float] | None = None,
) -> dict[str, float]:
    """One eval point: held-out objective metrics (given, or computed), plus a (KL, reward) frontier point
    when sampling is on."""
    metrics = held_out_metrics if held_out_metrics is not None else evaluate(model, batches, loss_fn, device)
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
    initial_metrics: dict[str, float] | None = None,
) -> Path:
    """Train `model` in place; returns the `final/` checkpoint dir. `initial_metrics` are the held-out
    metrics at step 0 when the stage already has them."""
    t = cfg.trainer
    accumulation_steps = t.batch_size_examples // t.microbatch_size_examples
    steps_per_epoch = len(train_examples) // t.batch_size_examples
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{len(train_examples)} training examples cannot fill one batch of "
            f"trainer.batch_size_examples={t.batch_size_examples}"
        )
    total_steps = t.max_steps or t.num_epochs * steps_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.RMSprop(params, lr=cfg.lr)
    # Linear warm-up from 0 then constant, as in the paper's code (App. B).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (t.lr_warmup_steps + 1))
    )

    start_step = 0
    resume_from = latest_resumable(run_dir) if cfg.resume else None
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE, weights_only=False)
        model.load_state_dict(type(model).from_pretrained(resume_from).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        if frontier is not None:
            frontier.first_prompt_rewards = state["frontier_first_prompt_rewards"]
        start_step = state["step"]
    else:
        eval_point(model, 0, eval_batches, loss_fn, frontier, logger, device, initial_metrics)

    def save(step: int) -> Path:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "frontier_first_prompt_rewards": frontier.first_prompt_rewards if frontier else None,
        }
        path = save_resumable(model, tokenizer, run_dir / "checkpoints" / f"step-{step}", state)
        keep_newest(run_dir, t.keep_checkpoints)
        return path

    def non_finite(what: str, step: int, batch: Batch) -> None:
        if t.nan_policy == "skip_batch":
            return
        prompts = sorted(
            {tokenizer.decode(train_examples[i].prompt_ids) for i in batch["example_ids"].tolist()}
        )
        last_good = latest_resumable(run_dir) or "none (set trainer.save_every_steps)"
        raise RunStopped(
            f"step {step}: {what} is not finite on training examples {batch['example_ids'].tolist()} "
            f"(prompts {prompts[:3]}); last good checkpoint: {last_good}; "
            "trainer.nan_policy=skip_batch drops such batches instead"
        )

    batches = train_batches(
        train_examples,
        t.microbatch_size_examples,
        tokenizer.pad_token_id,
        seed=cfg.seed,
        by_prompt=t.batch_by_prompt,
        skip=start_step * accumulation_steps,
    )
    skipped_batches = 0
    progress = tqdm(
        range(start_step + 1, total_steps + 1),
        desc=f"{cfg.stage} ({cfg.loss.name})",
        unit="step",
        initial=start_step,
        total=total_steps,
    )
    # Ctrl-C finishes the step in flight, saves a resumable checkpoint and stops (twice: stop at once).
    with _interruptible() as interrupted:
        for step in progress:
            model.train()
            started = time.perf_counter()
            parts, finite = [], True
            for _ in range(accumulation_steps):
                batch = to_device(next(batches), device)
                loss, metrics = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    non_finite("the loss", step, batch)
                    finite = False
                    continue
                (loss / accumulation_steps).backward()
                parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if finite and not torch.isfinite(grad_norm):
                non_finite("the gradient norm", step, batch)
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
            if step % cfg.logger.log_every_steps == 0 or step == total_steps:
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
            if step % t.eval_every_steps == 0 or step == total_steps:
                eval_metrics = eval_point(model, step, eval_batches, loss_fn, frontier, logger, device)
                shown = {k: v for k, v in eval_metrics.items() if k.split("/", 1)[1] in CONSOLE_METRICS}
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
            if t.save_every_steps and step % t.save_every_steps == 0 and step != total_steps:
                save(step)
            if interrupted.requested:
                kept = save(step)
                raise RunStopped(f"interrupted: saved {kept} (step {step}); continue with resume=true")

    return save_model(model, tokenizer, run_dir / "final")
