"""`dpo-run prefs`: sample K completions per prompt, score them, write ranked preference records.

This is how the embedded sentiment data is made (paper App. C.1: the SFT model samples 4 completions per
prefix and the reward orders them). Records: {"prompt", "responses", "rewards", "ranking", "split"}, ranking
best first; `data.min_reward_gap` later decides which of the K*(K-1)/2 pairs become training pairs.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dpo_cli.checkpoints import check_weights, replaced_atomically
from dpo_cli.config import stage_view
from dpo_cli.data import SHIPPED_OPENINGS, json_rows
from dpo_cli.engine.rundir import provenance
from dpo_cli.errors import ConfigError
from dpo_cli.models import load_model, resolve_device
from dpo_cli.rewards import make_reward_fn
from dpo_cli.sampling import sample_completions


def run(cfg: DictConfig, run_dir: Path) -> None:
    p = cfg.prefs
    prompts_path = Path(p.prompts_path) if p.prompts_path else SHIPPED_OPENINGS
    output_path = Path(p.output_path) if p.output_path else run_dir / "records.jsonl"
    if output_path.exists():
        raise ConfigError(f"prefs.output_path={output_path} exists; move it away or choose another path")
    prompt_records = read_jsonl_prompts(prompts_path)[: p.max_prompts]
    # The model sampled from: checkpoint= (as in eval and winrate) or sft_checkpoint=, else the preset.
    if cfg.checkpoint and cfg.sft_checkpoint and cfg.checkpoint != cfg.sft_checkpoint:
        raise ConfigError(
            f"prefs samples from one model: checkpoint={cfg.checkpoint} and sft_checkpoint="
            f"{cfg.sft_checkpoint} differ; pass one of them"
        )
    source = cfg.checkpoint or cfg.sft_checkpoint
    checkpoint = (
        check_weights(Path(source), "checkpoint" if cfg.checkpoint else "sft_checkpoint") if source else None
    )

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    origin = provenance(cfg, sampled_from=checkpoint)
    print(f"prefs: sampling from {origin['sampled_from']['path']}")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(stage_view(cfg) | {"provenance": origin}))
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, checkpoint=checkpoint)
    device = resolve_device(cfg.trainer.device)
    model.to(device)
    reward_fn = make_reward_fn(cfg.reward, device)

    prompts = [r["prompt"] for r in prompt_records]
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        num_samples=p.num_samples,
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        batch_size_prompts=p.batch_size_prompts,
        seed=cfg.seed,
    )
    rewards = reward_fn(
        [q for q, s in zip(prompts, samples, strict=True) for _ in s], [c for s in samples for c in s]
    )

    # Write next to the target and rename: an interrupted run never leaves a half-written records file.
    with replaced_atomically(output_path) as tmp_path, tmp_path.open("w") as f:
        for i, (record, completions) in enumerate(zip(prompt_records, samples, strict=True)):
            scores = [round(r, 4) for r in rewards[i * p.num_samples : (i + 1) * p.num_samples]]
            ranking = sorted(range(len(completions)), key=lambda k: -scores[k])
            row = {
                "prompt": record["prompt"],
                "responses": completions,
                "rewards": scores,
                "ranking": ranking,
            }
            f.write(json.dumps(row | {"split": record.get("split", "train")}) + "\n")

    mean_reward = sum(rewards) / len(rewards)
    print(f"wrote {len(prompts)} prompts x {p.num_samples} scored samples to {output_path}")
    print(f"mean {cfg.reward.name} reward {mean_reward:+.3f}")
    print(f"next: dpo-run sft data=jsonl {shlex.quote(f'data.path={output_path}')}")


def read_jsonl_prompts(path: Path) -> list[dict]:
    rows = []
    for where, row in json_rows(path, f"prefs.prompts_path={path}"):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)):
            raise ConfigError(f"{where}: field 'prompt' must be a string")
        rows.append(row)
    return rows
