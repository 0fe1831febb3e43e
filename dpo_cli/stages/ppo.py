"""`dpo-run ppo`: the paper's RL baseline (Sec. 3, Fig. 2): PPO on the KL-penalised reward of Eq. 3, from
the SFT checkpoint, which is also the frozen reference; `ppo.algorithm=rloo` for REINFORCE leave-one-out.

The recipe: the SFT checkpoint is the policy init (plus a value head for ppo) and the reference; the
training reward is `reward=` (PPO-GT: the true reward) or the reward model at `ppo.reward_model_path`;
the data are rollouts sampled from the policy inside the shared training loop (`rollouts.Rollouts`), so
checkpoints, resume and the frontier's eval points (KL to the reference, `reward=`'s score) are those of
every other method.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from dpo_cli import adapters
from dpo_cli.data import example_splits, sft_view
from dpo_cli.engine import loop, rundir
from dpo_cli.engine.backends import backend_class
from dpo_cli.errors import ConfigError
from dpo_cli.evaluate import make_frontier
from dpo_cli.logging import RunLogger
from dpo_cli.models import load_model
from dpo_cli.rewards import learned_reward, make_reward_fn
from dpo_cli.rollouts import Rollouts, add_value_head, make_ppo_objective


def run(cfg: DictConfig, run_dir: Path) -> None:
    if cfg.ppo.algorithm == "ppo" and adapters.wanted(cfg):
        raise ConfigError(
            f"peft={cfg.peft.name} with ppo.algorithm=ppo: the value head would stay frozen under "
            "the adapter; use ppo.algorithm=rloo (no value head) or peft=none"
        )
    sft_dir = rundir.find_sft_checkpoint(cfg)
    train, _, eval_records = example_splits(cfg.data, sft_view)
    prompts = list(dict.fromkeys(prompt for prompt, *_ in train))
    run = rundir.prepare(cfg, run_dir)
    print(f"ppo: policy init and reference = {sft_dir}; {len(prompts)} training prompts")
    policy, tokenizer = load_model(
        cfg.model, seed=cfg.seed, checkpoint=sft_dir, quantization=adapters.quantization(cfg)
    )
    policy.to(run.device)
    if adapters.wanted(cfg):
        policy = adapters.wrap(policy, cfg)
    elif cfg.ppo.algorithm == "ppo":
        add_value_head(policy)
    Backend = backend_class(cfg)
    if adapters.wanted(cfg):  # the SFT model is the policy with its adapter off: nothing to load
        reference = adapters.ReferenceView(policy)
    else:
        reference = Backend.frozen(
            cfg, load_model(cfg.model, seed=cfg.seed, checkpoint=sft_dir)[0], run.device
        )
    if cfg.ppo.reward_model_path:
        print(
            f"ppo: training reward = the reward model {cfg.ppo.reward_model_path}; eval points score "
            f"with reward={cfg.reward.name}"
        )
        reward_fn = learned_reward(cfg.ppo.reward_model_path, run.device)
    else:
        reward_fn = make_reward_fn(cfg.reward, run.device)

    logger = RunLogger(cfg, run_dir)
    frontier = make_frontier(cfg, eval_records, tokenizer, reference, run_dir)
    load_base = lambda: load_model(cfg.model, seed=cfg.seed, checkpoint=sft_dir)[0]  # noqa: E731
    backend = Backend(cfg, policy, tokenizer, run.device, load_base=load_base)
    data = Rollouts(cfg, prompts, tokenizer, backend.module, reference, reward_fn)
    loop.train(cfg, run, backend, data, make_ppo_objective(cfg), frontier, logger)
    logger.close()
    rundir.finish(run_dir, "dpo-run -m ppo beta=0.05,0.1,1", "a beta sweep traces PPO's reward/KL frontier")
