"""`dpo-run ppo` (PPO-GT, RLOO, PPO on a learned reward) and `dpo-run rm` end to end on the tiny model.

The task is one the random tiny model can learn in seconds: prompts "Film N was", each with the
completions " :)" and " :(" (a ranked record, best first). SFT learns to say either about half of the time;
VADER scores "Film 3 was :)" 0.46 and "Film 3 was :(" -0.44, so an RL stage that works moves the policy to
" :)" within a few rollouts, and a reward model learns to rank the two.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dpo_cli.cli import main
from dpo_cli.config_stages import RewardConfig
from dpo_cli.errors import RunStopped
from dpo_cli.logging import read_metrics
from dpo_cli.rewards import make_reward_fn

pytestmark = pytest.mark.slow


def common(root: Path, records: Path) -> list[str]:
    return [
        "model=tiny",
        "logger=none",
        f"output_root={root}",
        "data=jsonl",
        f"data.path={records}",
        "data.max_eval_examples=8",
        "eval.num_prompts=6",
        "eval.samples_per_prompt=8",
    ]


PPO = ["lr=1e-3", "beta=0.05", "ppo.response_length=4", "trainer.eval_every_steps=8"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ppo")
    records = root / "smileys.jsonl"
    rows = [{"prompt": f"Film {i} was", "responses": [" :)", " :("], "ranking": [0, 1]} for i in range(60)]
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    main(["sft", *common(root, records), "trainer.max_steps=100", "lr=3e-3", "trainer.eval_every_steps=100",
          "run_name=sft"])  # fmt: skip
    return root, records


def ppo_dir(root: Path, run_name: str) -> Path:
    return root / "default" / "ppo" / run_name


@pytest.fixture(scope="module")
def gt_run(sft_run) -> Path:
    """PPO-GT: PPO on the true reward (VADER), 4 rollouts of 8 completions, 4 PPO epochs each."""
    root, records = sft_run
    main(["ppo", *common(root, records), *PPO, "trainer.max_steps=16", "run_name=gt"])
    return ppo_dir(root, "gt")


def test_ppo_gt_raises_the_true_reward_and_writes_a_run(gt_run):
    run_dir = gt_run
    assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "final"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "final" / "config.json").is_file()
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if "eval/reward" in m]
    assert [m["step"] for m in evals] == [0, 8, 16]
    # SFT says " :)" about half of the time (mean reward near 0); 4 rollouts move it most of the way.
    assert evals[-1]["eval/reward_delta"] > 0.1
    assert evals[-1]["eval/reward_delta"] > 3 * evals[-1]["eval/reward_delta_se"]
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == list(range(1, 17))
    first = train[0]
    # The first update of the first rollout: the policy is the reference and the sampling policy.
    assert first["train/kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["train/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["train/clipfrac"] == 0.0 and first["train/value_clipfrac"] == 0.0
    assert first["train/values"] == 0.0  # the value head starts at zero


def test_ppo_resumed_mid_rollout_ends_bit_identical(sft_run, monkeypatch):
    """A rollout is 4 optimizer steps (4 PPO epochs of one mini-batch); checkpoints every 2 steps, so the
    run stopped in step 7 resumes from step 6, half-way through its second rollout."""
    root, records = sft_run
    args = [*common(root, records), *PPO, "trainer.max_steps=8", "trainer.save_every_steps=2"]
    main(["ppo", *args, "run_name=straight"])

    import dpo_cli.stages.ppo as ppo_stage

    make = ppo_stage.make_ppo_objective

    def stopping_in_step_7(cfg):
        objective, calls = make(cfg), iter(range(1, 100))

        def wrapped(model, batch):
            if next(calls) == 7:
                raise RunStopped("stopped in step 7")
            return objective(model, batch)

        return wrapped

    monkeypatch.setattr(ppo_stage, "make_ppo_objective", stopping_in_step_7)
    with pytest.raises(SystemExit):
        main(["ppo", *args, "run_name=halves"])
    assert sorted(p.name for p in (ppo_dir(root, "halves") / "checkpoints").iterdir()) == ["step-4", "step-6"]
    monkeypatch.setattr(ppo_stage, "make_ppo_objective", make)
    main(["ppo", *args, "run_name=halves", "resume=true"])

    straight = load_file(ppo_dir(root, "straight") / "final" / "model.safetensors")
    resumed = load_file(ppo_dir(root, "halves") / "final" / "model.safetensors")
    # final/ is the policy alone (its value head trained beside it, in the checkpoints only).
    assert "value_head.weight" in load_file(
        ppo_dir(root, "halves") / "checkpoints" / "step-6" / "model.safetensors"
    )
    assert straight.keys() == resumed.keys() and "value_head.weight" not in straight
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    def lines(run_name: str) -> list[dict]:
        return [
            {k: v for k, v in m.items() if k != "train/examples_per_second"}
            for m in read_metrics(ppo_dir(root, run_name))
        ]

    assert lines("halves") == lines("straight")


def test_a_ppo_beta_sweep_traces_its_frontier(sft_run):
    """`dpo-run -m ppo beta=...` after `dpo-run sft`: one run a beta, and the sweep's frontier.csv has each
    run's eval points under its label, step 0 at the reference."""
    root, records = sft_run
    settings = [arg for arg in PPO if not arg.startswith("beta=")]
    main(["-m", "ppo", *common(root, records), *settings, "beta=0.05,1", "trainer.max_steps=8",
          "run_name=sweep_${beta}"])  # fmt: skip
    [sweep] = [p for p in (root / "default" / "ppo").glob("multirun-*") if (p / "sweep_0.05").is_dir()]
    betas = [OmegaConf.load(sweep / job / "config.yaml").beta for job in ("sweep_0.05", "sweep_1.0")]
    assert betas == [0.05, 1.0]
    rows = list(csv.DictReader((sweep / "frontier.csv").open()))
    assert sorted((r["label"], int(r["step"])) for r in rows) == [
        ("ppo beta=0.05", 0),
        ("ppo beta=0.05", 8),
        ("ppo beta=1", 0),
        ("ppo beta=1", 8),
    ]
    assert all(float(r["kl"]) == 0.0 for r in rows if r["step"] == "0")
    assert all(float(r["kl"]) > 0.0 for r in rows if r["step"] == "8")  # the policies moved
    assert (sweep / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_rloo_trains_without_a_value_head(sft_run):
    root, records = sft_run
    main(["ppo", *common(root, records), *PPO, "ppo.algorithm=rloo", "trainer.max_steps=16", "run_name=rloo"])
    run_dir = ppo_dir(root, "rloo")
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "train/loss" in m]
    assert "train/value_loss" not in train[0] and train[0]["train/kl"] == pytest.approx(0.0, abs=1e-5)
    assert not any(k.startswith("value_head") for k in load_file(run_dir / "final" / "model.safetensors"))
    # 8 completions a rollout: 2 prompts x rloo_k = 4 samples each.
    assert [m for m in metrics if "eval/reward" in m][-1]["eval/reward_delta"] > 0.1


def test_a_reward_model_learns_the_preferences_and_ppo_trains_on_it(sft_run, gt_run):
    root, records = sft_run
    main(["rm", *common(root, records), "lr=1e-3", "trainer.max_steps=20", "trainer.eval_every_steps=10",
          "run_name=rm"])  # fmt: skip
    rm_dir = root / "default" / "rm" / "rm"
    evals = [m for m in read_metrics(rm_dir) if "eval/rewards/accuracies" in m]
    assert [m["step"] for m in evals] == [0, 10, 20]
    assert evals[-1]["eval/rewards/accuracies"] == 1.0 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]

    reward = make_reward_fn(RewardConfig(name="model", path=str(rm_dir / "final")))
    happy, sad = reward(["Film 99 was", "Film 99 was"], [" :)", " :("])
    assert happy > sad

    main(["ppo", *common(root, records), *PPO, f"ppo.reward_model_path={rm_dir / 'final'}",
          "trainer.max_steps=8", "run_name=learned"])  # fmt: skip
    learned, gt = read_metrics(ppo_dir(root, "learned")), read_metrics(gt_run)
    # The eval points score with reward= (VADER) either way: the step-0 points (the SFT model) agree.
    assert learned[0]["eval/reward"] == gt[0]["eval/reward"]
    train = [m for m in learned if "train/reward" in m]
    assert train[0]["train/reward"] != next(m for m in gt if "train/reward" in m)["train/reward"]
    assert [m for m in learned if "eval/reward" in m][-1]["eval/reward_delta"] > 0


def test_ppo_under_deepspeed_resumes_mid_rollout_bit_identical(sft_run):
    """ZeRO-2 on 2 CPU ranks: each rank samples and trains on its own share of every rollout; a run resumed
    from its step-2 checkpoint (half-way through the first rollout: both ranks' rollouts are in it) ends
    with the same weights and metrics as the run that went straight through."""
    root, records = sft_run
    args = ["ppo", *common(root, records), *PPO, "trainer=zero2", "trainer.num_processes=2",
            "trainer.max_steps=4", "trainer.batch_size_examples=8", "trainer.microbatch_size_examples=2",
            "trainer.save_every_steps=2", f"sft_checkpoint={root / 'default/sft/sft/final'}"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def dpo_run(*extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "dpo_cli.cli", *args, *extra], env=env, text=True,
                              capture_output=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    dpo_run("run_name=zero2")
    shutil.copytree(ppo_dir(root, "zero2"), ppo_dir(root, "zero2_resumed"))
    shutil.rmtree(ppo_dir(root, "zero2_resumed") / "final")
    dpo_run("run_name=zero2_resumed", "resume=true")
    straight = load_file(ppo_dir(root, "zero2") / "final" / "model.safetensors")
    resumed = load_file(ppo_dir(root, "zero2_resumed") / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys() and "value_head.weight" not in straight
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    metrics = [read_metrics(ppo_dir(root, name)) for name in ("zero2", "zero2_resumed")]
    for lines in metrics:
        for m in lines:
            m.pop("train/examples_per_second", None)
    assert metrics[0] == metrics[1] and [m["step"] for m in metrics[0] if "train/loss" in m] == [1, 2, 3, 4]
