"""Frontier evaluation (paper Fig. 2 left): sample from the policy, score with the true reward, estimate KL.

Every eval point samples `eval.samples_per_prompt` completions for the same `eval.num_prompts` held-out
prompts with the same seed, so points of one run and of different runs are paired. The KL estimate is the
paper's: the mean over samples y ~ pi of log pi(y|x) - log pi_ref(y|x), sequence-level (summed over the
completion's tokens); it is unbiased only for samples drawn at temperature 1 from pi itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli.checkpoints import torch_save_atomically
from dpo_cli.data.batches import TokenizedExample, collate
from dpo_cli.data.chat import Text, jsonable
from dpo_cli.distributed import is_main
from dpo_cli.logps import model_token_logps
from dpo_cli.rewards import RewardFn
from dpo_cli.sampling import Samples, sample


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); se is 0 for a single value."""
    values = values.double()
    se = values.std(unbiased=True).item() / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return values.mean().item(), se


def distinct_n(token_ids: list[list[int]], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over every completion; it falls when a
    policy buys reward with repetitive or collapsed text."""
    ngrams = [tuple(ids[i : i + n]) for ids in token_ids for i in range(len(ids) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


@torch.no_grad()
def completion_logps(
    model: PreTrainedModel, samples: Samples, pad_token_id: int, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y|x) summed over completion tokens, completion length in tokens) for every sample."""
    device = next(model.parameters()).device
    logps, lengths = [], []
    for start in range(0, len(samples.completion_ids), batch_size):
        examples = [
            TokenizedExample(tuple(p), (tuple(c),))
            for p, c in zip(
                samples.prompt_ids[start : start + batch_size],
                samples.completion_ids[start : start + batch_size],
                strict=True,
            )
        ]
        batch = {k: v.to(device) for k, v in collate(examples, pad_token_id).items()}
        per_token, mask = model_token_logps(model, batch)
        rows = batch["index"][:, 0]  # identical samples collapse to one row; gather them back
        logps.append((per_token * mask).sum(-1)[rows].cpu())
        lengths.append(mask.sum(-1)[rows].cpu())
    return torch.cat(logps), torch.cat(lengths)


class FrontierEvaluator:
    """Produces one (KL, reward) point per call, paired with the first call's samples (the step-0 model)."""

    def __init__(
        self,
        cfg: DictConfig,
        prompts: list[Text],
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel,
        reward_fn: RewardFn,
        run_dir: Path,
        reference_point_file: Path | None = None,
    ):
        self.cfg, self.prompts, self.tokenizer = cfg, prompts, tokenizer
        self.reference, self.reward_fn = reference, reward_fn
        self.samples_file = Path(run_dir) / "samples.jsonl"
        self.first_prompt_rewards: torch.Tensor | None = None
        # Where the step-0 point is cached when the step-0 model is the reference itself (DPO from its
        # SFT checkpoint): every job of a sweep starts from the same samples, so they are drawn once.
        self.reference_point_file = reference_point_file

    def state_dict(self) -> dict:
        """What a resumed run needs to pair its points with the step-0 point."""
        return {"first_prompt_rewards": self.first_prompt_rewards}

    def load_state_dict(self, state: dict) -> None:
        self.first_prompt_rewards = state["first_prompt_rewards"]

    def sample_and_score(self, model: PreTrainedModel, num_samples: int) -> tuple[Samples, torch.Tensor]:
        e = self.cfg
        samples = sample(
            model,
            self.tokenizer,
            self.prompts,
            num_samples=num_samples,
            max_new_tokens=e.max_new_tokens,
            temperature=e.temperature,
            batch_size_prompts=e.batch_size_prompts,
            seed=e.seed,
            desc="eval sampling",
        )
        return samples, torch.tensor(
            self.reward_fn(samples.prompts, samples.completions), dtype=torch.float64
        )

    def __call__(self, model: PreTrainedModel, step: int) -> tuple[dict[str, float], list[dict]]:
        """Metrics of this point and its sample rows (also appended to samples.jsonl)."""
        cached = self.reference_point_file if step == 0 else None
        if cached is not None and cached.is_file():
            saved = torch.load(cached, weights_only=False)
            metrics, rows = saved["metrics"], saved["rows"]
            self.first_prompt_rewards = saved["prompt_rewards"]
        else:
            metrics, rows = self.point(model, step)
            if cached is not None and is_main():
                entry = {"metrics": metrics, "rows": rows, "prompt_rewards": self.first_prompt_rewards}
                torch_save_atomically(entry, cached)
        if is_main():  # every rank samples the same rows (same seed); rank 0 writes them
            with self.samples_file.open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return metrics, rows

    def point(self, model: PreTrainedModel, step: int) -> tuple[dict[str, float], list[dict]]:
        k = self.cfg.samples_per_prompt
        samples, rewards = self.sample_and_score(model, k)
        pad = self.tokenizer.pad_token_id
        policy_logps, lengths = completion_logps(model, samples, pad)
        reference_logps, _ = completion_logps(self.reference, samples, pad)
        log_ratios = policy_logps - reference_logps
        metrics = {}
        metrics["eval/reward"], metrics["eval/reward_se"] = mean_and_se(rewards)
        metrics["eval/kl"], metrics["eval/kl_se"] = mean_and_se(log_ratios)
        metrics["eval/length_tokens"] = lengths.double().mean().item()
        metrics["eval/kl_per_token"] = metrics["eval/kl"] / max(metrics["eval/length_tokens"], 1.0)
        # Fluency beside the reward: how likely the reference finds the text, and how varied it is.
        metrics["eval/ref_logp_per_token"] = (reference_logps / lengths.clamp(min=1)).double().mean().item()
        metrics["eval/distinct_2"] = distinct_n(samples.completion_ids, 2)
        # Paired against the first point (same prompts, same seed): per-prompt mean reward differences
        # cancel the prompt-to-prompt spread, which dominates the unpaired standard error.
        prompt_rewards = rewards.view(-1, k).mean(-1)
        if self.first_prompt_rewards is None:
            self.first_prompt_rewards = prompt_rewards
        metrics["eval/reward_delta"], metrics["eval/reward_delta_se"] = mean_and_se(
            prompt_rewards - self.first_prompt_rewards
        )
        rows = [
            {"step": step, "prompt": jsonable(p), "completion": c, "reward": r, "log_ratio": lr}
            for p, c, r, lr in zip(
                samples.prompts, samples.completions, rewards.tolist(), log_ratios.tolist(), strict=True
            )
        ]
        return metrics, rows


def best_of_n(evaluator: FrontierEvaluator, model: PreTrainedModel, n: int) -> dict[str, float]:
    """Best-of-N baseline: N samples per prompt, keep the highest reward. Its KL to the sampling model has
    the closed form log(N) - (N - 1) / N (Stiennon et al. 2020, App. G; exact without reward ties)."""
    _, rewards = evaluator.sample_and_score(model, n)
    best = rewards.view(-1, n).max(-1).values
    reward, reward_se = mean_and_se(best)
    return {
        "eval/bon_n": n,
        "eval/bon_reward": reward,
        "eval/bon_reward_se": reward_se,
        "eval/bon_kl": math.log(n) - (n - 1) / n,
    }


def make_frontier(
    cfg: DictConfig,
    held_out_records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    reference: PreTrainedModel,
    run_dir: Path,
    *,
    reference_point_dir: Path | None = None,
) -> FrontierEvaluator | None:
    """The run's frontier evaluator on the first `eval.num_prompts` held-out prompts (None when off).
    `reference_point_dir`: the policy starts as the reference (DPO from its SFT checkpoint), so its step-0
    point is the same in every job of a sweep and is cached there, keyed by the eval setup and prompts."""
    if cfg.eval.num_prompts == 0:
        return None
    from dpo_cli.rewards import make_reward_fn

    prompts = list(dict.fromkeys(r["prompt"] for r in held_out_records))[: cfg.eval.num_prompts]
    reward_fn = make_reward_fn(cfg.reward, next(reference.parameters()).device)
    point_file = None
    if reference_point_dir is not None:
        setup = OmegaConf.to_container(cfg.eval) | {"reward": OmegaConf.to_container(cfg.reward)}
        key = hashlib.sha256(json.dumps([setup, prompts], sort_keys=True).encode()).hexdigest()
        point_file = Path(reference_point_dir) / f"frontier-{key[:24]}.pt"
    return FrontierEvaluator(cfg.eval, prompts, tokenizer, reference, reward_fn, run_dir, point_file)
