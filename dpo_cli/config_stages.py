"""The schema of the groups that sample, score and judge: `reward`, `eval` (frontier points and `dpo-run
eval`), `prefs` (`dpo-run prefs`), `judge` and `winrate` (`dpo-run winrate`), `ppo` (`dpo-run ppo`).
dpo_cli/config.py assembles them into the root config; each group's range and cross-field checks are
its `problems`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from dpo_cli.choices import JudgeName, JudgeTemplate, PPOAlgorithm, RewardName


def at_least(prefix: str, node: DictConfig, low: float, *keys: str) -> list[str]:
    """The problems of `node`'s `keys` that are not a finite number >= `low` (None: the key is unset, and
    allowed). Every numeric key of the schema goes through this or `positive`, so that no out-of-range,
    NaN or infinite value reaches the code."""
    return [
        f"{prefix}{key}={node[key]}: must be {'a finite number ' if isinstance(node[key], float) else ''}"
        f">= {low}"
        for key in keys
        if node[key] is not None and not (math.isfinite(node[key]) and node[key] >= low)
    ]


def positive(prefix: str, node: DictConfig, *keys: str) -> list[str]:
    """The problems of `node`'s float `keys` that are not a finite number > 0 (None allowed, as above)."""
    return [
        f"{prefix}{key}={node[key]}: must be a finite number > 0"
        for key in keys
        if node[key] is not None and not (math.isfinite(node[key]) and node[key] > 0)
    ]


@dataclass
class RewardConfig:
    name: RewardName = RewardName.vader
    """vader: VADER compound sentiment in [-1, 1] (offline) | hf_classifier: a label's probability |
    model: the scalar score of a reward model trained by `dpo-run rm` (`path`)."""
    path: str = ""
    """model: the reward model's dir (a `dpo-run rm` run's final/)."""
    model_name_or_path: str = ""
    """hf_classifier: hub id or local dir of a sequence-classification model."""
    label: str = "POSITIVE"
    """hf_classifier: the label whose probability is the reward."""
    batch_size: int = 32
    """hf_classifier: texts per forward pass."""
    max_length_tokens: int = 512
    """hf_classifier: texts are truncated to this many tokens."""

    @staticmethod
    def problems(r: DictConfig) -> list[str]:
        p = []
        if r.name == RewardName.hf_classifier and not r.model_name_or_path:
            p.append("reward=hf_classifier needs reward.model_name_or_path=HUB_ID_OR_DIR")
        if r.name == RewardName.model and not r.path:
            p.append("reward=model needs reward.path=DIR (the final/ of a `dpo-run rm` run)")
        if r.path and r.name != RewardName.model:
            p.append(f"reward.path={r.path} is read by reward=model only, not reward={r.name}")
        return p + at_least("reward.", r, 1, "batch_size", "max_length_tokens")


@dataclass
class EvalConfig:
    """Frontier evaluation at every eval point: sample, score with the true reward, estimate KL."""

    num_prompts: int = 48
    """Held-out prompts sampled at every eval point (0 turns sampling evaluation off)."""
    samples_per_prompt: int = 4
    """Completions per prompt; several per prompt make the paired reward change resolve."""
    temperature: float = 1.0
    """Sampling temperature. The KL estimate assumes samples from the policy itself, i.e. 1.0."""
    max_new_tokens: int = 24
    """Tokens sampled per completion."""
    seed: int = 1234
    """Sampling seed, the same at every eval of every run, so points are paired across steps and runs."""
    batch_size_prompts: int = 16
    """Prompts per generate() call."""
    num_table_samples: int = 8
    """(prompt, completion, reward) rows logged to wandb per eval point; all go to samples.jsonl."""
    best_of_n: list[int] = field(default_factory=lambda: [1, 4, 16])
    """`dpo-run eval`: Best-of-N baselines, N samples per prompt, the best by reward kept."""

    @staticmethod
    def problems(e: DictConfig) -> list[str]:
        p = at_least("eval.", e, 0, "num_prompts", "seed", "num_table_samples")
        p += at_least("eval.", e, 1, "samples_per_prompt", "max_new_tokens", "batch_size_prompts")
        p += positive("eval.", e, "temperature")
        if not all(n >= 1 for n in e.best_of_n):
            p.append(f"eval.best_of_n={e.best_of_n}: each N >= 1")
        return p


@dataclass
class PreviewConfig:
    """`dpo-run preview [STAGE] [overrides]`: the first examples as STAGE's model sees them; writes
    nothing."""

    num_examples: int = 3
    """Examples shown."""
    held_out: bool = False
    """Show held-out examples instead of training ones."""

    @staticmethod
    def problems(c: DictConfig) -> list[str]:
        return at_least("preview.", c, 1, "num_examples")


@dataclass
class PrefsConfig:
    """The `prefs` stage: sample completions per prompt, score them, write ranked records."""

    prompts_path: str | None = None
    """JSONL of {"prompt": ..., "split": ...}; None = the embedded sentiment openings."""
    output_path: str | None = None
    """Where to write records; None = `records.jsonl` in the run dir."""
    num_samples: int = 4
    """Completions sampled per prompt (the paper's sentiment setup: 4, giving up to 6 pairs)."""
    max_new_tokens: int = 24
    """Tokens sampled per completion."""
    temperature: float = 1.0
    """Sampling temperature (1.0 = the model's own distribution, as the reference must be)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    batch_size_prompts: int = 32
    """Prompts per generate() call (each expanded to `num_samples` rows)."""
    max_prompts: int | None = None
    """Cap on prompts (for quick runs)."""

    @staticmethod
    def problems(c: DictConfig) -> list[str]:
        p = at_least("prefs.", c, 2, "num_samples")
        p += at_least("prefs.", c, 1, "max_new_tokens", "batch_size_prompts", "max_prompts")
        p += positive("prefs.", c, "temperature")
        if not 0 < c.top_p <= 1:
            p.append(f"prefs.top_p={c.top_p}: must be in (0, 1]")
        return p


@dataclass
class JudgeConfig:
    """Who compares two completions for `dpo-run winrate` (dpo_cli/judge.py)."""

    name: JudgeName = JudgeName.openai
    """openai: an LLM behind any OpenAI-compatible chat-completions endpoint | reward: the larger
    `reward=` score wins (offline; the sentiment task and tests)."""
    base_url: str = "https://api.openai.com/v1"
    """Endpoint root; requests go to `<base_url>/chat/completions` (a local vLLM or llama.cpp server:
    http://127.0.0.1:8000/v1)."""
    model: str = "gpt-4o"
    """Judge model name as the server knows it."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never logged or written);
    unset or empty: no Authorization header (local servers)."""
    template: JudgeTemplate = JudgeTemplate.auto
    """Judge prompt: summary (the paper's "concise" variant) | dialogue ("helpful") | auto (summary for
    data=tldr, dialogue otherwise)."""
    both_orders: bool = True
    """Ask every comparison in both orders (position bias cancels; a flipped verdict is a tie). false: one
    request per comparison in a seeded random order."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    timeout_seconds: float = 60.0
    """Per-request timeout; a timed-out request is retried."""
    max_retries: int = 5
    """Retries of a request after HTTP 429, 5xx, a timeout or a dropped connection."""
    backoff_seconds: float = 1.0
    """Wait before the first retry; doubles at every retry (a server's Retry-After wins), capped at 60 s."""
    max_answer_tokens: int = 256
    """max_tokens of the judge's answer (a one-sentence comparison and the verdict line)."""
    temperature: float = 0.0
    """Judge sampling temperature (0: its most likely verdict, which also makes the cache exact)."""
    cache_path: str | None = None
    """JSONL cache of answers keyed by (server, judge model, prompt, both texts, order); None =
    `<output_root>/judge_cache.jsonl`, shared by all runs, so a rerun pays only for what is missing."""
    seed: int = 0
    """Order of the two texts when `both_orders=false`."""

    @staticmethod
    def problems(j: DictConfig) -> list[str]:
        p = at_least("judge.", j, 1, "max_concurrency", "max_answer_tokens")
        p += at_least("judge.", j, 0, "max_retries", "backoff_seconds", "temperature", "seed")
        p += positive("judge.", j, "timeout_seconds")
        if j.name == JudgeName.openai and not (j.base_url and j.model):
            p.append("judge=openai needs judge.base_url=URL and judge.model=NAME")
        elif j.name == JudgeName.openai and not j.base_url.startswith(("http://", "https://")):
            p.append(f"judge.base_url={j.base_url}: must start with http:// or https://")
        return p


@dataclass
class WinrateConfig:
    """`dpo-run winrate`: how the policy's completions are made."""

    num_prompts: int = 256
    """Held-out prompts compared (or the first prompts of a `baseline=` samples file)."""
    max_new_tokens: int = 128
    """Tokens sampled per completion."""
    batch_size_prompts: int = 16
    """Prompts per generate() call."""
    seed: int = 1234
    """Sampling seed, the same for every checkpoint, so runs compare on the same random stream."""

    @staticmethod
    def problems(w: DictConfig) -> list[str]:
        return at_least("winrate.", w, 1, "num_prompts", "max_new_tokens", "batch_size_prompts") + at_least(
            "winrate.", w, 0, "seed"
        )


@dataclass
class PPOConfig:
    """`dpo-run ppo`: the paper's RL baseline on the KL-penalised reward (Eq. 3), its KL coefficient the
    top-level `beta` (TRL's kl_coef). Names follow TRL's PPOConfig / RLOOConfig where they have the key.

    Every rollout samples one completion (ppo) or `rloo_k` (rloo) for each of its prompts from the current
    policy, `ppo.num_mini_batches * trainer.batch_size_examples` completions in all; then
    `num_ppo_epochs` passes over them, each in `num_mini_batches` optimizer steps of
    trainer.batch_size_examples completions. `trainer.max_steps` counts optimizer steps."""

    algorithm: PPOAlgorithm = PPOAlgorithm.ppo
    """ppo: per-token KL penalty, a value head on the policy, GAE, clipped policy and value losses |
    rloo: REINFORCE with a leave-one-out baseline over `rloo_k` samples per prompt, no value head."""
    num_ppo_epochs: int = 4
    """Passes over each rollout's samples."""
    num_mini_batches: int = 1
    """Optimizer steps per pass over a rollout (each of trainer.batch_size_examples completions)."""
    cliprange: float = 0.2
    """epsilon of the clipped surrogate: the policy ratio is clipped to [1 - eps, 1 + eps]."""
    cliprange_value: float = 0.2
    """ppo: the value estimate moves at most this far from the rollout's before its error is clipped."""
    vf_coef: float = 0.1
    """ppo: weight of the value loss beside the policy loss (the value head shares the policy's body)."""
    gamma: float = 1.0
    """ppo: discount over the completion's tokens, in [0, 1]."""
    lam: float = 0.95
    """ppo: GAE's lambda, in [0, 1]."""
    whiten_rewards: bool = False
    """ppo: normalise the per-token rewards of each rollout (advantages are always whitened)."""
    rloo_k: int = 4
    """rloo: completions sampled per prompt (>= 2); each one's baseline is the mean reward of the others."""
    response_length: int = 24
    """Tokens sampled per completion (at temperature 1: the policy's own distribution, which the
    importance ratios and the KL penalty assume)."""
    reward_model_path: str | None = None
    """Train on the score of this reward model (a `dpo-run rm` final/ dir) instead of `reward=`, which
    still scores the frontier's eval points (PPO with a learned reward vs PPO-GT)."""

    @staticmethod
    def problems(c: DictConfig) -> list[str]:
        p = at_least("ppo.", c, 1, "num_ppo_epochs", "num_mini_batches", "response_length")
        p += positive("ppo.", c, "cliprange", "cliprange_value") + at_least("ppo.", c, 0, "vf_coef")
        p += at_least("ppo.", c, 2, "rloo_k")
        for key in ("gamma", "lam"):
            if not 0 <= c[key] <= 1:
                p.append(f"ppo.{key}={c[key]}: must be in [0, 1]")
        if c.reward_model_path and not (Path(c.reward_model_path) / "config.json").is_file():
            p.append(f"ppo.reward_model_path={c.reward_model_path}: not a model dir (no config.json)")
        # A key the algorithm does not read must stay at its default: set, it would be ignored.
        defaults = PPOConfig()
        for key, algorithm in PPO_ONLY_KEYS.items():
            if c.algorithm != algorithm and c[key] != getattr(defaults, key):
                p.append(f"ppo.{key}={c[key]} only applies to ppo.algorithm={algorithm}, not {c.algorithm}")
        return p


PPO_ONLY_KEYS = {
    **dict.fromkeys(("cliprange_value", "vf_coef", "gamma", "lam", "whiten_rewards"), PPOAlgorithm.ppo),
    "rloo_k": PPOAlgorithm.rloo,
}
"""The `ppo.*` keys that one algorithm reads, and which."""
