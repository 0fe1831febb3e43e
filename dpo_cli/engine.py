"""The training loop shared by every stage: optimizer, warm-up, accumulation, clipping, eval, checkpoints.

A stage hands over a model, tokenized examples and `loss_fn(model, batch) -> (loss, metrics)`; metrics are
per-batch means (floats) that the loop averages over micro-batches weighted by examples.
"""

from __future__ import annotations

import os
import random
import shutil
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

from dpo_cli.config import ConfigError
from dpo_cli.data.batches import TokenizedExample, collate
from dpo_cli.logging import RunLogger
from dpo_cli.models import resolve_device

Batch = dict[str, torch.Tensor]
LossFn = Callable[[PreTrainedModel, Batch], tuple[torch.Tensor, dict[str, float]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run(cfg: DictConfig, run_dir: Path) -> torch.device:
    """Refuse to clobber an earlier run, then fix threads and seeds; returns the training device."""
    previous = [run_dir / name for name in ("metrics.jsonl", "final") if (run_dir / name).exists()]
    if previous and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run; pick another run_name=NAME or pass overwrite=true to replace it"
        )
    for path in previous:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed)
    return resolve_device(cfg.trainer.device)


def finish(run_dir: Path, next_command: str, why: str) -> None:
    """Tell the user what the run wrote and what to run next (with the overrides that locate this run)."""
    written = ", ".join(
        sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if p.name[0] != ".")
    )
    print(f"\nwrote {run_dir}/: {written}")
    carried = ""
    if HydraConfig.initialized():
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
    examples: list[TokenizedExample], microbatch_size: int, pad_token_id: int, *, seed: int, by_prompt: bool
) -> Iterator[Batch]:
    """Endless shuffled micro-batches, epoch after epoch; the last partial micro-batch of an epoch is dropped.

    With `by_prompt`, prompts are shuffled and each prompt's examples stay adjacent, so the pairs of one
    prompt share a batch and their common completions are scored once (the paper's App. B batching).
    """
    generator = torch.Generator().manual_seed(seed)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        groups[example.prompt_ids if by_prompt else (i,)].append(i)
    members = list(groups.values())
    while True:
        order = [i for g in torch.randperm(len(members), generator=generator).tolist() for i in members[g]]
        for start in range(0, len(order) - microbatch_size + 1, microbatch_size):
            yield collate([examples[i] for i in order[start : start + microbatch_size]], pad_token_id)


def _mean_metrics(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    total = sum(n for n, _ in parts)
    sums: dict[str, float] = defaultdict(float)
    for n, metrics in parts:
        for k, v in metrics.items():
            sums[k] += v * n
    return {k: v / total for k, v in sums.items()}


@torch.no_grad()
def evaluate(model: PreTrainedModel, batches: list[Batch], loss_fn: LossFn, device: torch.device) -> dict:
    model.eval()
    parts = []
    for batch in tqdm(batches, desc="eval", unit="batch", leave=False):
        loss, metrics = loss_fn(model, to_device(batch, device))
        parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
    return {f"eval/{k}": v for k, v in _mean_metrics(parts).items()}


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """An HF-format dir (save_pretrained), written beside the target and renamed into place, so a crash
    mid-write never leaves a half-written checkpoint where a later stage would pick it up."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def train(
    cfg: DictConfig,
    run_dir: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: list[TokenizedExample],
    eval_batches: list[Batch],
    loss_fn: LossFn,
    device: torch.device,
) -> Path:
    """Train `model` in place; returns the `final/` checkpoint dir."""
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

    logger = RunLogger(cfg, run_dir)
    logger.log(evaluate(model, eval_batches, loss_fn, device), step=0)
    batches = train_batches(
        train_examples,
        t.microbatch_size_examples,
        tokenizer.pad_token_id,
        seed=cfg.seed,
        by_prompt=t.batch_by_prompt,
    )
    progress = tqdm(range(1, total_steps + 1), desc=f"{cfg.stage} ({cfg.loss.name})", unit="step")
    for step in progress:
        model.train()
        started = time.perf_counter()
        parts = []
        for _ in range(accumulation_steps):
            batch = to_device(next(batches), device)
            loss, metrics = loss_fn(model, batch)
            (loss / accumulation_steps).backward()
            parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        # Free the gradients now: the next forward needs the memory.
        optimizer.zero_grad(set_to_none=True)

        train_metrics = _mean_metrics(parts)
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
            logger.log(logged, step=step)
        if step % t.eval_every_steps == 0 or step == total_steps:
            eval_metrics = evaluate(model, eval_batches, loss_fn, device)
            logger.log(eval_metrics, step=step)
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        if t.save_every_steps and step % t.save_every_steps == 0 and step != total_steps:
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            save_checkpoint(model, tokenizer, run_dir / "checkpoints" / f"step-{step}")
    final = save_checkpoint(model, tokenizer, run_dir / "final")
    logger.close()
    return final
