"""Issue 21 (3, 4, 7): frontier labels from the keys that differ, Best-of-N placement, `dpo-run plot` and
`dpo-run runs`."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dpo_cli import evaluate
from dpo_cli.cli import main
from dpo_cli.frontier import gather_points
from dpo_cli.sampling import Samples
from dpo_cli.stages.winrate import COLUMNS


def make_run(run_dir: Path, config: dict, lines: list[dict], final: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if final:
        (run_dir / "final").mkdir()
    return run_dir


def dpo(**changes) -> dict:
    config = {"stage": "dpo", "exp_name": "x", "run_name": "r", "seed": 0, "beta": 0.1, "lr": 2e-5,
              "loss": {"name": "dpo", "alpha": 1.0}, "trainer": {"max_steps": 80, "device": "cpu"},
              "logger": {"name": "none"}}  # fmt: skip
    for key, value in changes.items():
        group, _, sub = key.partition("__")
        config[group] = {**config[group], sub: value} if sub else value
    return config


def points(kl: float, reward: float, step: int = 80) -> list[dict]:
    return [
        {"step": 0, "eval/kl": 0.0, "eval/reward": 0.1, "eval/rewards/accuracies": 0.5},
        {"step": step, "eval/kl": kl, "eval/reward": reward, "eval/rewards/accuracies": 0.7},
    ]


def labels(root: Path) -> set[str]:
    return {row["label"] for row in gather_points([root])}


def test_an_lr_sweep_and_a_seed_sweep_get_distinct_labels(tmp_path):
    """Issue 21 (3): `-m dpo lr=1e-5,1e-3` labelled both runs `dpo beta=0.1`."""
    make_run(tmp_path / "lr" / "a", dpo(lr=1e-5, run_name="lr-1e-5"), points(1.0, 0.3))
    make_run(tmp_path / "lr" / "b", dpo(lr=1e-3, run_name="lr-1e-3"), points(2.0, 0.4))
    assert labels(tmp_path / "lr") == {"dpo beta=0.1 lr=1e-05", "dpo beta=0.1 lr=0.001"}
    make_run(tmp_path / "seed" / "a", dpo(seed=1, trainer__device="cuda"), points(1.0, 0.3))
    make_run(tmp_path / "seed" / "b", dpo(seed=2), points(2.0, 0.4))
    assert labels(tmp_path / "seed") == {"dpo beta=0.1 seed=1", "dpo beta=0.1 seed=2"}  # not the device
    make_run(tmp_path / "mix" / "a", dpo(beta=0.5), points(1.0, 0.3))
    make_run(tmp_path / "mix" / "b", dpo(loss__name="unlikelihood", loss__alpha=0.5), points(2.0, 0.4))
    assert labels(tmp_path / "mix") == {"dpo beta=0.5", "unlikelihood alpha=0.5"}  # nothing else differs
    make_run(tmp_path / "same" / "a", dpo(), points(1.0, 0.3))
    make_run(tmp_path / "same" / "b", dpo(), points(2.0, 0.4))
    assert labels(tmp_path / "same") == {"dpo beta=0.1 (a)", "dpo beta=0.1 (b)"}


def test_best_of_n_kl_is_the_closed_form_plus_the_kept_samples_log_ratio(monkeypatch):
    """Issue 21 (4). N = 2, two prompts; rewards [0.1, 0.9 | 0.8, 0.2] keep samples 1 and 2, whose
    log pi - log pi_ref are (-1.0 - -3.0) = 2.0 and (-2.0 - -2.5) = 0.5: KL(bon || ref) =
    log 2 - 1/2 + (2.0 + 0.5) / 2 = 0.1931 + 1.25."""
    samples = Samples(prompts=["a", "a", "b", "b"], prompt_ids=[[1]] * 4,
                      completion_ids=[[10], [11], [12], [13]], completions=["w", "x", "y", "z"])  # fmt: skip
    policy_logps = {11: -1.0, 12: -2.0, 10: -9.0, 13: -9.0}
    ref_logps = {11: -3.0, 12: -2.5, 10: -9.0, 13: -9.0}

    class Evaluator:
        reference = object()
        tokenizer = type("T", (), {"pad_token_id": 0})

        def sample_and_score(self, model, n):
            return samples, torch.tensor([0.1, 0.9, 0.8, 0.2], dtype=torch.float64)

    def fake_logps(model, kept, pad):
        table = ref_logps if model is Evaluator.reference else policy_logps
        return torch.tensor([table[c[0]] for c in kept.completion_ids]), None

    monkeypatch.setattr(evaluate, "completion_logps", fake_logps)
    point = evaluate.best_of_n(Evaluator(), object(), 2)
    assert point["eval/bon_kl_to_sampler"] == pytest.approx(math.log(2) - 0.5)
    assert point["eval/bon_kl"] == pytest.approx(math.log(2) - 0.5 + 1.25)
    assert point["eval/bon_reward"] == pytest.approx(0.85)
    # Drawn from the reference itself: the closed form alone.
    reference_point = evaluate.best_of_n(Evaluator(), Evaluator.reference, 2)
    assert reference_point["eval/bon_kl"] == pytest.approx(math.log(2) - 0.5)


def test_best_of_n_points_name_their_model_and_an_unknown_kl_gets_its_own_panel(tmp_path):
    dpo_run = make_run(tmp_path / "dpo" / "beta-0.1", dpo(), points(3.0, 0.5))
    bon = {"step": 0, "eval/bon_n": 4, "eval/bon_reward": 0.6, "eval/bon_reward_se": 0.01}
    evaluation = {"stage": "eval", "run_name": "e", "checkpoint": str(dpo_run / "final")}
    make_run(tmp_path / "eval" / "new", evaluation | {"run_name": "new"},
             [bon | {"eval/bon_kl": 3.9, "eval/bon_kl_to_sampler": 0.64}], final=False)  # fmt: skip
    make_run(tmp_path / "eval" / "old", evaluation | {"run_name": "old"},
             [bon | {"eval/bon_kl": 0.64}], final=False)  # fmt: skip
    make_run(tmp_path / "eval" / "sft", {"stage": "eval", "run_name": "sft", "checkpoint": None},
             [bon | {"eval/bon_kl": 0.64}], final=False)  # fmt: skip
    rows = {(Path(r["run_dir"]).name, r["label"]): r for r in gather_points([tmp_path / "eval"])}
    assert rows["new", "best-of-N N=4 of dpo beta=0.1"]["kl"] == 3.9  # at its KL to the reference
    assert rows["old", "best-of-N N=4 of dpo beta=0.1"]["kl"] is None  # KL to its own sampler only
    assert rows["sft", "best-of-N N=4 of sft"]["kl"] == 0.64  # drawn from the reference: exact
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "eval"), "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "frontier.png").is_file()


def test_plot_draws_the_frontier_and_the_win_rates(tmp_path, capsys):
    make_run(tmp_path / "dpo" / "a", dpo(), points(3.0, 0.5))
    winrate = make_run(tmp_path / "winrate" / "w", {"stage": "winrate", "run_name": "w"}, [], final=False)
    with (winrate / "winrate.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerow(
            ["dpo beta=0.1", "policy", 0.0, 0.6, 0.5, 0.7, 10, 6, 4, 0, 0, 0, "c", "dataset", "j"]
        )
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path), "--out", str(tmp_path / "fig")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "(2 points from 1 runs)" in out and "(1 win rates)" in out
    for name in ("frontier.csv", "frontier.png", "winrate.csv", "winrate.png"):
        assert (tmp_path / "fig" / name).is_file(), name


def test_plot_without_runs_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 1 and "no eval points" in capsys.readouterr().out


def test_runs_lists_stage_overrides_metrics_and_status(tmp_path, capsys, monkeypatch):
    make_run(tmp_path / "x" / "dpo" / "lr-1e-05", dpo(lr=1e-5), points(1.0, 0.3))
    unfinished = make_run(
        tmp_path / "x" / "dpo" / "lr-0.001", dpo(lr=1e-3), points(2.0, 0.45, step=40), final=False
    )
    (unfinished / ".hydra").mkdir()  # Hydra's own, unresolved copy: not a run
    (unfinished / ".hydra" / "config.yaml").write_text("run_name: ${hydra:job.override_dirname}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["runs", "x"])
    assert exit_info.value.code == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["stage", "run", "apart", "step"]
    assert "reward" in header and "KL" in header and "accuracy" in header and "status" in header
    finished = next(line for line in lines if "lr-1e-05" in line)
    unfinished = next(line for line in lines if "lr-0.001" in line)
    assert "lr=1e-05" in finished and "0.3000" in finished and "1.0000" in finished and "finished" in finished
    assert "lr=0.001" in unfinished and "40" in unfinished and "not finished" in unfinished
