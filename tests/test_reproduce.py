"""scripts/reproduce_frontier.sh wires up: every method runs and one figure and table come out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_cli.config import validate
from tests.test_adapters import compose_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("experiment", "model", "data", "reward"),
    [
        ("sentiment_frontier", "smollm2_135m", "sentiment", "vader"),
        ("imdb_frontier_paper", "gpt2_large", "imdb", "hf_classifier"),
    ],
)
def test_frontier_presets_compose(experiment, model, data, reward):
    for stage in ("sft", "dpo", "eval", "rm", "ppo"):
        cfg = compose_config(f"experiment={experiment}", f"stage={stage}")
        validate(cfg)
        assert (cfg.exp_name, cfg.model.name, cfg.data.name, cfg.reward.name) == (
            experiment,
            model,
            data,
            reward,
        )
    assert cfg.eval.num_prompts >= 24
    if experiment == "imdb_frontier_paper":  # App. C.1: siebert reward, all 6 pairs, App. B optimisation
        assert "siebert" in cfg.reward.model_name_or_path and cfg.data.min_reward_gap == 0
        assert (cfg.trainer.batch_size_examples, cfg.trainer.optimizer, cfg.beta) == (64, "rmsprop", 0.1)


@pytest.mark.slow
def test_reproduction_script_runs_every_method_with_the_tiny_model(tmp_path):
    overrides = ["model=tiny", "trainer.max_steps=2", "trainer.eval_every_steps=1", "logger=none",
                 "eval.num_prompts=2", "data.max_eval_examples=8", f"output_root={tmp_path}"]  # fmt: skip
    env = os.environ | {"PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts/reproduce_frontier.sh"), *overrides], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "sentiment_frontier"
    assert (root / "frontier.png").stat().st_size > 10_000
    assert (root / "learning_curves.png").stat().st_size > 10_000
    results = (root / "results.md").read_text()
    for label in ["dpo beta=0.05", "dpo beta=5", "unlikelihood alpha=0.05", "unlikelihood alpha=1",
                  "preferred_ft seed=2", "best-of-N N=16 of sft", "eval sft_best_of_n", "ppo beta=0.05",
                  "ppo beta=1", "ppo_rm beta=0.1"]:  # fmt: skip
        assert f"| {label} |" in results, label
    assert "over 3 training seeds" in results and "over 3 sampling seeds" in results
    assert "Reward model (rm): held-out pair accuracy" in results
    # A second run refuses instead of mixing old and new sweeps into one figure.
    again = subprocess.run(["bash", str(ROOT / "scripts/reproduce_frontier.sh"), *overrides], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "exists" in again.stderr
