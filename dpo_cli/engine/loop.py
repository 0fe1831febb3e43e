"""The training loop shared by every training stage: forward through the objective, backward, clip, step,
log, evaluate, checkpoint, stop on Ctrl-C. Read top to bottom, this is how a step runs.

A stage hands over a backend (`backends.py`: where weights, gradients and optimizer live), this rank's
micro-batches (`data.batches.TrainData`: order, packing and rank sharding are the data's business; or
`rollouts.Rollouts`, which samples them from the model being trained) and an objective `(model, batch) ->
(loss, metrics)`; metrics are per-batch means that the loop averages over micro-batches (and ranks)
weighted by examples. A checkpoint keeps the data's `state_dict` beside the weights and optimizer.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dpo_cli import distributed
from dpo_cli.adapters import count_parameters
from dpo_cli.checkpoints import TRAINER_STATE, keep_newest, latest_resumable
from dpo_cli.data.batches import Batch, TrainData
from dpo_cli.engine.rundir import RunDir
from dpo_cli.errors import ConfigError, RunStopped
from dpo_cli.evaluate import FrontierEvaluator
from dpo_cli.logging import RunLogger
from dpo_cli.objective import Objective

if TYPE_CHECKING:
    from dpo_cli.rollouts import Rollouts

CONSOLE_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "reward", "reward_delta", "kl")


def train(
    cfg: DictConfig,
    run: RunDir,
    backend,
    data: TrainData | Rollouts,
    objective: Objective,
    frontier: FrontierEvaluator | None,
    logger: RunLogger,
) -> Path:
    """Train `backend`'s model in place from `run.start_step` to `data.num_steps`; returns `final/`."""
    t = cfg.trainer
    if run.resume_from is not None:
        _resume(cfg, backend, run.resume_from, frontier, data)
    else:
        trainable, total = count_parameters(backend.module)
        sizes = {"train/trainable_parameters": trainable, "train/parameters": total}
        with backend.autocast():
            eval_point(backend.module, 0, data.eval_batches, objective, frontier, logger, run.device, sizes)

    def save(step: int) -> Path:
        state = {"step": step, "engine": t.engine, "world_size": distributed.world_size()}
        path = run.path / "checkpoints" / f"step-{step}"
        extra = {"frontier": frontier.state_dict() if frontier else None, "data": data.state_dict()}
        backend.save(path, state | extra)
        if distributed.is_main():
            keep_newest(run.path, t.keep_checkpoints)
        return path

    skipped_batches = 0
    progress = tqdm(
        range(run.start_step + 1, data.num_steps + 1),
        desc=f"{cfg.stage} ({cfg.loss.name})",
        unit="step",
        initial=run.start_step,
        total=data.num_steps,
        disable=None,  # no bar when the output is a file: its carriage returns would fill the log
    )
    # Ctrl-C, SIGTERM or a preemption finishes the step in flight, saves a resumable checkpoint and stops
    # (a second Ctrl-C: at once).
    with _interruptible() as interrupted:
        for step in progress:
            backend.module.train()
            started, lr = time.perf_counter(), backend.lr()
            train_metrics, grad_norm, applied = _optimizer_step(cfg, run, backend, data, objective, step)
            skipped_batches += not applied
            progress.set_postfix(
                {k: f"{v:.3f}" for k, v in train_metrics.items() if k in ("loss", "rewards/accuracies")}
            )
            if step % cfg.logger.log_every_steps == 0 or step == data.num_steps:
                logged = {f"train/{k}": v for k, v in train_metrics.items()}
                logged |= {
                    "train/grad_norm": grad_norm.item(),
                    "train/lr": lr,
                    "train/examples_per_second": t.batch_size_examples / (time.perf_counter() - started),
                    "train/examples": step * t.batch_size_examples,
                }
                if t.nan_policy == "skip_batch":
                    logged["train/skipped_batches"] = skipped_batches
                logger.log(logged, step=step)
            if step % t.eval_every_steps == 0 or step == data.num_steps:
                with backend.autocast():
                    metrics = eval_point(
                        backend.module, step, data.eval_batches, objective, frontier, logger, run.device
                    )
                shown = {k: v for k, v in metrics.items() if k.split("/", 1)[1] in CONSOLE_METRICS}
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
            if t.save_every_steps and step % t.save_every_steps == 0 and step != data.num_steps:
                save(step)
            # Every rank stops at the same step (the save is a collective under DeepSpeed).
            if distributed.any_true(interrupted.by is not None):
                stopped = RunStopped(
                    f"interrupted ({interrupted.by or 'on another rank'}): saved {save(step)} (step {step}); "
                    "continue with resume=true"
                )
                interrupted.hand_over(stopped)  # submitit's preemption: it requeues the job and exits
                raise stopped
    return backend.save_final(run.path / "final")


def _optimizer_step(
    cfg: DictConfig, run: RunDir, backend, data: TrainData, objective: Objective, step: int
) -> tuple[dict[str, float], torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches: (the step's mean metrics, the gradient norm,
    whether the update was applied). A non-finite loss or gradient stops the run (`trainer.nan_policy=
    stop`) or drops the update (`skip_batch`)."""
    parts, finite = [], True
    for _ in range(backend.accumulation_steps):
        batch = to_device(next(data.batches), run.device)
        with backend.autocast():  # backward runs outside it, in the dtypes forward chose
            loss, metrics = objective(backend.module, batch)
        if not distributed.all_true(bool(torch.isfinite(loss))):  # every rank stops, or none
            _non_finite(cfg, run, backend, data, "the loss", batch, step)
            finite = False
            continue
        backend.backward(loss)
        parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
    grad_norm = backend.step(apply=finite)
    if finite and not torch.isfinite(grad_norm):
        if not backend.overflowed:  # an fp16 overflow is the loss scaler's business: it skipped the step
            _non_finite(cfg, run, backend, data, "the gradient norm", batch, step)
        finite = False
    return distributed.mean_over_ranks(parts), grad_norm, finite


def _non_finite(cfg, run: RunDir, backend, data: TrainData, what: str, batch: Batch, step: int) -> None:
    """Stop with the step, the examples and the last good checkpoint, unless batches may be skipped."""
    if cfg.trainer.nan_policy == "skip_batch":
        return
    example_ids = [i for ids in distributed.gather(batch["example_ids"].tolist()) for i in ids]
    prompts = sorted({backend.tokenizer.decode(data.examples[i].prompt_ids) for i in example_ids})
    last_good = latest_resumable(run.path) or "none (set trainer.save_every_steps)"
    hint = (
        "trainer.nan_policy=skip_batch drops such batches instead"
        if backend.can_skip_batches
        else "DeepSpeed runs stop on it"
    )
    raise RunStopped(
        f"step {step}: {what} is not finite on training examples {example_ids} "
        f"(prompts {prompts[:3]}); last good checkpoint: {last_good}; {hint}"
    )


def _resume(
    cfg: DictConfig, backend, checkpoint: Path, frontier: FrontierEvaluator | None, data: TrainData | Rollouts
) -> None:
    state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
    written_by = (state["engine"], state["world_size"])
    if written_by != (cfg.trainer.engine, distributed.world_size()):
        raise ConfigError(
            f"{checkpoint} was written by trainer.engine={written_by[0]} with {written_by[1]} rank(s); "
            f"resume with the same trainer and number of ranks (now {cfg.trainer.engine}, "
            f"{distributed.world_size()})"
        )
    backend.load(checkpoint, state)
    if frontier is not None:
        frontier.load_state_dict(state["frontier"])
    data.load_state_dict(state.get("data"))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, batches: list[Batch], objective: Objective, device: torch.device) -> dict[str, float]:
    """Held-out loss and metrics of the stage's objective (every rank runs the same batches)."""
    model.eval()
    parts = []
    for batch in tqdm(batches, desc="eval", unit="batch", leave=False, disable=None):
        loss, metrics = objective(model, to_device(batch, device))
        parts.append((len(batch["index"]), {"loss": loss.item(), **metrics}))
    return {f"eval/{k}": v for k, v in distributed.mean_over_ranks(parts).items()}


def eval_point(
    model,
    step: int,
    batches: list[Batch],
    objective: Objective,
    frontier: FrontierEvaluator | None,
    logger: RunLogger,
    device: torch.device,
    also: dict[str, float] | None = None,
) -> dict[str, float]:
    """One eval point: held-out objective metrics, plus a (KL, reward) frontier point when sampling is on
    (and `also`, logged in the same line)."""
    metrics = evaluate(model, batches, objective, device) | (also or {})
    if frontier is not None:
        frontier_metrics, rows = frontier(model, step)
        metrics |= frontier_metrics
        logger.log_samples(rows, step)
    logger.log(metrics, step=step)
    return metrics


class _Interrupt:
    by: str | None = None
    """The signal that asked the run to stop ("Ctrl-C", "SIGTERM", "SIGUSR2 (preemption)"), or None."""
    signum: int | None = None
    previous: dict[int, Any]
    """The handlers the stop signals had before the loop's (submitit's, under Hydra's submitit launcher)."""

    def hand_over(self, stopped: RunStopped) -> None:
        """After the checkpoint of a preemption signal: submitit's own handler requeues the job, whose rerun
        resumes from it (distributed.requeued), and exits."""
        if self.signum is not None and self.signum == distributed.preemption_signal():
            print(f"dpo-run: {stopped}; requeueing the job", file=sys.stderr, flush=True)
            handler = self.previous.get(self.signum)
            if callable(handler):
                handler(self.signum, None)


def _stop_signals() -> dict[int, str]:
    # SIGTERM is what Slurm and Kubernetes send before they kill a job: it gets the same graceful stop, and
    # so does submitit's preemption signal (SIGUSR2 unless $SUBMITIT_PREEMPT_SIGNAL says otherwise).
    signals = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    preemption = distributed.preemption_signal()
    if preemption is not None:
        signals[preemption] = f"{signal.Signals(preemption).name} (preemption)"
    return signals


@contextlib.contextmanager
def _interruptible() -> Iterator[_Interrupt]:
    state, names = _Interrupt(), _stop_signals()

    def on_signal(signum, frame) -> None:
        if state.by is not None:
            # A second Ctrl-C quits now. A second SIGTERM is the same stop arriving twice (Slurm signals
            # every process of the job, and torchrun passes its own on to the ranks): the save goes on.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        state.by, state.signum = names[signum], signum
        again = " (Ctrl-C again to quit now)" if signum == signal.SIGINT else ""
        print(f"\ndpo-run: {state.by}: finishing this step, then saving a checkpoint{again}", flush=True)

    state.previous = {signum: signal.signal(signum, on_signal) for signum in names}
    try:
        yield state
    finally:
        for signum, handler in state.previous.items():
            signal.signal(signum, handler)
