"""On-policy training data for `dpo-run ppo`: rollouts sampled from the policy being trained, inside the
training loop, and the PPO / RLOO objectives that train on them.

`Rollouts` stands where a preference stage's `TrainData` stands (engine/loop.py reads its `batches`,
`eval_batches`, `num_steps` and `examples`, and keeps its `state_dict` in every checkpoint). When the loop
asks for a micro-batch and the current rollout is spent, it samples the next one from the model the loop
trains: one completion per prompt (ppo) or `rloo_k` (rloo) for the next training prompts, scored by the
reward, by the policy (log-probs of the sampled tokens; the value head's estimates) and by the frozen
reference, and turned into advantages (`losses.rlhf`). It then serves the rollout as `num_ppo_epochs`
shuffled passes of micro-batches, `num_mini_batches` optimizer steps per pass. Sampling and shuffling are
seeded by (seed, rollout number, rank), so a resumed run, whose checkpoint holds the rollout in progress
and how much of it was served, continues bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from dpo_cli import distributed
from dpo_cli.data.batches import Batch, TokenizedExample, collate
from dpo_cli.errors import ConfigError
from dpo_cli.logps import model_token_logps
from dpo_cli.losses.rlhf import (
    gae,
    kl_penalized_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)
from dpo_cli.objective import Objective
from dpo_cli.rewards import RewardFn
from dpo_cli.sampling import sample


@dataclass
class Rollout:
    """One rollout of this rank: R completions, prompt-major. Per-token tensors are (R, L), a completion's
    tokens from column 0 (`mask`); `advantages` is (R, L) for ppo and (R,) for rloo (sequence-level)."""

    prompt_ids: list[tuple[int, ...]]
    completion_ids: list[tuple[int, ...]]
    prompt_index: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def add_value_head(model: torch.nn.Module) -> torch.nn.Module:
    """PPO's critic: a linear head on the policy's last hidden state, a submodule of the model (so the
    backend trains, checkpoints and shards it with the policy), zero at the start."""
    hidden_size = model.config.get_text_config().hidden_size
    parameter = next(model.parameters())
    model.value_head = torch.nn.Linear(hidden_size, 1, device=parameter.device, dtype=parameter.dtype)
    torch.nn.init.zeros_(model.value_head.weight)
    torch.nn.init.zeros_(model.value_head.bias)
    return model


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT


def logps_and_values(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`logps.model_token_logps` of the batch and the value head's estimate at the same positions (N, T-1),
    from the hidden states of that one forward (a hook on the decoder keeps them)."""
    lm = _causal_lm(model)
    captured: list[torch.Tensor] = []
    hook = lm.base_model.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        per_token, mask = model_token_logps(model, batch)
    finally:
        hook.remove()
    # The hidden state at position t predicts token t + 1, as the logits there do.
    values = lm.value_head(captured[-1][:, :-1]).squeeze(-1).float()
    return per_token, mask, values


def token_batch(prompt_ids: list[tuple[int, ...]], completion_ids: list[tuple[int, ...]], pad: int) -> Batch:
    """One right-padded row per completion (identical samples keep their own rows), as `collate` lays
    them out; `index` is the identity."""
    examples = [TokenizedExample(p, (c,)) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    batch = collate(examples, pad)
    rows = batch["index"][:, 0]
    n = len(examples)
    return {
        **{key: batch[key][rows] for key in ("input_ids", "attention_mask", "labels")},
        "index": torch.arange(n)[:, None],
        "index_mask": torch.ones(n, 1, dtype=torch.bool),
    }


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class Rollouts:
    """The loop's data for `dpo-run ppo` (see the module docstring); `model` is the one the loop trains."""

    def __init__(
        self,
        cfg: DictConfig,
        prompts: list[str],
        tokenizer: PreTrainedTokenizerBase,
        model: torch.nn.Module,
        reference: torch.nn.Module,
        reward_fn: RewardFn,
    ):
        self.cfg, self.ppo, self.prompts, self.tokenizer = cfg, cfg.ppo, prompts, tokenizer
        self.model, self.reference, self.reward_fn = model, reference, reward_fn
        t, world = cfg.trainer, distributed.world_size()
        self.samples_per_prompt = self.ppo.rloo_k if self.ppo.algorithm == "rloo" else 1
        self.completions = self.ppo.num_mini_batches * t.batch_size_examples // world  # per rank
        if self.completions % self.samples_per_prompt:
            raise ConfigError(
                f"ppo.algorithm=rloo: each of {world} ranks gets {self.completions} completions per rollout, "
                f"not a multiple of ppo.rloo_k={self.ppo.rloo_k}"
            )
        self.prompts_per_rank = self.completions // self.samples_per_prompt
        rollouts_per_epoch = len(prompts) // (self.prompts_per_rank * world)
        if rollouts_per_epoch < 1:
            raise ConfigError(
                f"{len(prompts)} training prompts cannot fill one rollout of "
                f"{self.prompts_per_rank * world} prompts"
            )
        self.steps_per_rollout = self.ppo.num_ppo_epochs * self.ppo.num_mini_batches
        self.microbatches_per_rollout = (
            self.ppo.num_ppo_epochs * self.completions // t.microbatch_size_examples
        )
        self.num_steps = t.max_steps or t.num_epochs * rollouts_per_epoch * self.steps_per_rollout
        self.eval_batches: list[Batch] = []  # PPO's held-out evaluation is the frontier's eval points
        self.examples = [TokenizedExample(tuple(tokenizer(p)["input_ids"]), ()) for p in prompts]
        self.rollouts_started, self.served, self.rollout = 0, 0, None
        self.batches = self._batches()

    def state_dict(self) -> list[dict]:
        """Every rank's rollout in progress and how much of it was served (a collective: rank 0 writes the
        trainer state, each rank reads its own entry back)."""
        rollout = None if self.rollout is None else asdict(self.rollout)
        state = {"rollouts_started": self.rollouts_started, "served": self.served, "rollout": rollout}
        return distributed.gather(state)

    def load_state_dict(self, states: list[dict]) -> None:
        state = states[distributed.rank()]
        self.rollouts_started, self.served = state["rollouts_started"], state["served"]
        self.rollout = None if state["rollout"] is None else Rollout(**state["rollout"])

    def _batches(self) -> Iterator[Batch]:
        while True:
            if self.rollout is None or self.served == self.microbatches_per_rollout:
                self.rollout, self.served = self._roll(self.rollouts_started), 0
                self.rollouts_started += 1
            # Each PPO epoch a fresh shuffle of the rollout's completions into micro-batches.
            number = self.rollouts_started - 1
            order = torch.Generator().manual_seed(_seed(self.cfg.seed, number, distributed.rank(), 2))
            epochs = [
                torch.randperm(self.completions, generator=order) for _ in range(self.ppo.num_ppo_epochs)
            ]
            for rows in torch.cat(epochs).split(self.cfg.trainer.microbatch_size_examples)[self.served :]:
                self.served += 1
                yield self._microbatch(rows)

    def _prompts_of(self, number: int) -> tuple[list[str], torch.Tensor]:
        """This rank's prompts of rollout `number`: epochs of seeded shuffles of all training prompts, each
        rollout the next `prompts_per_rank x world` of them, every rank its share."""
        world, per_rollout = distributed.world_size(), self.prompts_per_rank * distributed.world_size()
        per_epoch = len(self.prompts) // per_rollout
        epoch, within = divmod(number, per_epoch)
        order = torch.randperm(
            len(self.prompts), generator=torch.Generator().manual_seed(_seed(self.cfg.seed, epoch))
        )
        chosen = order[within * per_rollout : (within + 1) * per_rollout][distributed.rank() :: world]
        return [self.prompts[i] for i in chosen], chosen

    @torch.no_grad()
    def _roll(self, number: int) -> Rollout:
        """Sample rollout `number` from the current policy and score it."""
        prompts, prompt_index = self._prompts_of(number)
        k, pad = self.samples_per_prompt, self.tokenizer.pad_token_id
        was_training = self.model.training
        samples = sample(
            self.model,
            self.tokenizer,
            prompts,
            num_samples=k,
            max_new_tokens=self.ppo.response_length,
            batch_size_prompts=len(prompts),
            seed=_seed(self.cfg.seed, number, distributed.rank(), 1),
            desc="rollout",
        )
        scores = torch.tensor(self.reward_fn(samples.prompts, samples.completions), dtype=torch.float32)
        prompt_ids = [tuple(p) for p in samples.prompt_ids]
        completion_ids = [tuple(c) for c in samples.completion_ids]
        lengths = torch.tensor([len(c) for c in completion_ids])
        mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        logps, ref_logps, values = (torch.zeros(mask.shape) for _ in range(3))
        ppo = self.ppo.algorithm == "ppo"
        device = next(self.model.parameters()).device
        for rows in torch.arange(len(completion_ids)).split(self.cfg.trainer.microbatch_size_examples):
            batch = token_batch([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], pad)
            batch = {key: value.to(device) for key, value in batch.items()}
            if ppo:
                per_token, token_mask, token_values = logps_and_values(self.model, batch)
            else:
                (per_token, token_mask), token_values = model_token_logps(self.model, batch), None
            reference = model_token_logps(self.reference, batch)[0]
            # From the batch's (B, T-1) label layout to the rollout's: each completion from column 0.
            for target, scored in ((logps, per_token), (ref_logps, reference), (values, token_values)):
                if scored is not None:
                    target[rows] = target[rows].masked_scatter(mask[rows], scored[token_mask].cpu())
        self.model.train(was_training)
        beta = self.cfg.beta
        if ppo:
            rewards = kl_penalized_rewards(scores, logps, ref_logps, mask, beta=beta)
            if self.ppo.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, gamma=self.ppo.gamma, lam=self.ppo.lam)
            advantages = whiten(advantages, mask)
        else:
            # The sequence-level objective of Eq. 3 for each sample, baselined by its prompt's other samples.
            rewards = scores - beta * ((logps - ref_logps) * mask).sum(-1)
            advantages, returns, values = rloo_advantages(rewards.view(-1, k)).flatten(), None, None
        return Rollout(
            prompt_ids=prompt_ids,
            completion_ids=completion_ids,
            prompt_index=prompt_index.repeat_interleave(k),
            scores=scores,
            mask=mask,
            logps=logps,
            ref_logps=ref_logps,
            advantages=advantages,
            values=values,
            returns=returns,
        )

    def _microbatch(self, rows: torch.Tensor) -> Batch:
        """A training micro-batch of the rollout's completions `rows`, carrying their rollout quantities laid
        out as the batch's per-token log-probs are (B, T-1)."""
        r = self.rollout
        batch = token_batch(
            [r.prompt_ids[i] for i in rows], [r.completion_ids[i] for i in rows], self.tokenizer.pad_token_id
        )
        token_mask = batch["labels"][:, 1:] != -100

        def per_token(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(token_mask.shape).masked_scatter(token_mask, values[rows][r.mask[rows]])

        kl = ((r.logps - r.ref_logps) * r.mask).sum(-1)
        batch |= {
            "example_ids": r.prompt_index[rows],
            "old_logps": per_token(r.logps),
            "scores": r.scores[rows],
            "kl": kl[rows],
            "advantages": per_token(r.advantages) if r.values is not None else r.advantages[rows],
        }
        if r.values is not None:
            batch |= {"old_values": per_token(r.values), "returns": per_token(r.returns)}
        return batch


def make_ppo_objective(cfg: DictConfig) -> Objective:
    """The loss of a rollout micro-batch: ppo's clipped policy loss plus `vf_coef` times its clipped value
    loss, per token; rloo's clipped policy loss on the sequence-level ratio and advantage."""
    p = cfg.ppo

    def objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if p.algorithm == "ppo":
            logps, mask, values = logps_and_values(model, batch)
            policy_loss, stats = ppo_policy_loss(
                logps, batch["old_logps"], batch["advantages"], mask, cliprange=p.cliprange
            )
            value_loss, value_clipfrac = ppo_value_loss(
                values, batch["old_values"], batch["returns"], mask, cliprange_value=p.cliprange_value
            )
            loss = policy_loss + p.vf_coef * value_loss
            extra = {
                "value_loss": value_loss.item(),
                "value_clipfrac": value_clipfrac.item(),
                "values": masked_mean(values.detach(), mask).item(),
            }
        else:
            per_token, mask = model_token_logps(model, batch)
            logps, old_logps = (per_token * mask).sum(-1), (batch["old_logps"] * mask).sum(-1)
            whole = torch.ones_like(logps, dtype=torch.bool)
            policy_loss, stats = ppo_policy_loss(
                logps, old_logps, batch["advantages"], whole, cliprange=p.cliprange
            )
            loss, extra = policy_loss, {}
        return loss, {
            "policy_loss": policy_loss.item(),
            "clipfrac": stats["clipfrac"].item(),
            "approx_kl": stats["approx_kl"].item(),
            # The rollout's samples in this micro-batch: their reward and KL(pi_old || pi_ref) estimate.
            "reward": batch["scores"].mean().item(),
            "kl": batch["kl"].mean().item(),
            "length_tokens": mask.sum(-1).float().mean().item(),
            **extra,
        }

    return objective
