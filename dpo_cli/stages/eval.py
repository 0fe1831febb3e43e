"""`dpo-run eval`: one frontier point for any checkpoint, plus the Best-of-N baselines.

The reference is the experiment's SFT model (as in training), so the point lands on the same axes as the
training runs' points; `checkpoint` defaults to that SFT model itself (the KL-0 point).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from dpo_cli.checkpoints import check_weights
from dpo_cli.data import load_splits
from dpo_cli.engine import rundir
from dpo_cli.errors import ConfigError
from dpo_cli.evaluate import best_of_n, make_frontier
from dpo_cli.logging import RunLogger
from dpo_cli.models import load_model


def run(cfg: DictConfig, run_dir: Path) -> None:
    reference_dir = rundir.find_sft_checkpoint(cfg)
    checkpoint = check_weights(Path(cfg.checkpoint), "checkpoint") if cfg.checkpoint else reference_dir
    if cfg.eval.num_prompts == 0:
        raise ConfigError("eval.num_prompts=0 leaves `dpo-run eval` nothing to do; set it >= 1")
    device = rundir.prepare(cfg, run_dir).device
    print(f"eval: {checkpoint} against reference {reference_dir}")
    reference, tokenizer = load_model(cfg.model, seed=cfg.seed, checkpoint=reference_dir)
    reference.to(device).eval()
    policy = (
        reference
        if checkpoint.resolve() == reference_dir.resolve()
        else load_model(cfg.model, seed=cfg.seed, checkpoint=checkpoint)[0]
    )
    policy.to(device).eval()

    _, held_out = load_splits(cfg.data)
    logger = RunLogger(cfg, run_dir, rundir.provenance(cfg, policy=checkpoint, reference=reference_dir))
    frontier = make_frontier(cfg, held_out, tokenizer, reference, run_dir)
    metrics, rows = frontier(policy, 0)
    logger.log_samples(rows, 0)
    logger.log(metrics, step=0)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    for n in cfg.eval.best_of_n:
        point = best_of_n(frontier, policy, n)
        logger.log(point, step=0)
        print(
            f"best-of-{n} of {checkpoint}: reward {point['eval/bon_reward']:.4f} +/- "
            f"{point['eval/bon_reward_se']:.4f}, KL to the reference {point['eval/bon_kl']:.4f}"
        )
    logger.close()
    rundir.finish(
        run_dir,
        f"dpo-run plot {Path(cfg.output_root) / cfg.exp_name}",
        "every eval point of the experiment on one figure",
        carry_overrides=False,
    )
