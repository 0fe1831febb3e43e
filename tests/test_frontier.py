import csv
import json
import sys
from pathlib import Path

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dpo_cli.frontier import COLUMNS, FrontierCallback, gather_points, run_label, write_frontier
from dpo_cli.plot import main

# (step, kl, reward) of the eval points of the fake runs.
DPO_POINTS = {
    0.1: [(0, 0.0, 0.21), (100, 4.0, 0.45), (200, 9.5, 0.62)],
    1.0: [(0, 0.0, 0.21), (100, 0.8, 0.27), (200, 1.6, 0.31)],
}
UNLIKELIHOOD_POINTS = [(0, 0.0, 0.21), (100, 6.0, 0.30), (200, 14.0, 0.28)]


def make_run(run_dir: Path, config: dict, points: list[tuple[int, float, float]]) -> Path:
    """A run dir as the stages write it: config.yaml and metrics.jsonl with train lines around evals."""
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    lines = []
    for step, kl, reward in points:
        lines.append({"step": step, "train/loss": 0.69, "train/lr": 1e-5})
        lines.append({"step": step, "eval/loss": 0.6, "eval/rewards/accuracies": 0.7})  # eval, but no KL
        lines.append(
            {
                "step": step,
                "eval/kl": kl,
                "eval/kl_se": 0.1 * kl,
                "eval/reward": reward,
                "eval/reward_se": 0.02,
                "eval/reward_delta": reward - 0.21,
                "eval/reward_delta_se": 0.01,
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def dpo_config(beta: float, run_name: str) -> dict:
    return {
        "stage": "dpo",
        "exp_name": "x",
        "run_name": run_name,
        "seed": 0,
        "beta": beta,
        "loss": {"name": "dpo"},
    }


@pytest.fixture
def sweeps(tmp_path: Path) -> tuple[Path, Path]:
    """Two sweep dirs: DPO over beta (plus a run without eval points), and unlikelihood."""
    dpo_sweep, ul_sweep = tmp_path / "dpo" / "multirun-1", tmp_path / "ul" / "multirun-2"
    for beta, points in DPO_POINTS.items():
        make_run(dpo_sweep / f"beta={beta:g}", dpo_config(beta, f"beta={beta:g}"), points)
    make_run(dpo_sweep / "beta=5", dpo_config(5.0, "beta=5"), [])
    ul_config = {
        "stage": "dpo",
        "exp_name": "x",
        "run_name": "loss=unlikelihood",
        "seed": 0,
        "beta": 0.1,
        "loss": {"name": "unlikelihood", "alpha": 0.5},
    }
    make_run(ul_sweep / "loss=unlikelihood", ul_config, UNLIKELIHOOD_POINTS)
    return dpo_sweep, ul_sweep


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(b"\x89PNG")
    assert path.stat().st_size > 10_000


def test_run_label():
    assert run_label(OmegaConf.create(dpo_config(0.1, "r"))) == "dpo beta=0.1"
    assert (
        run_label(OmegaConf.create({"stage": "dpo", "beta": 0.5, "loss": {"name": "ipo"}})) == "ipo beta=0.5"
    )
    cdpo = {"stage": "dpo", "beta": 0.1, "loss": {"name": "cdpo", "label_smoothing": 0.1}}
    assert run_label(OmegaConf.create(cdpo)) == "cdpo beta=0.1 eps=0.1"
    pl = {"stage": "dpo", "beta": 0.1, "loss": {"name": "plackett_luce"}}
    assert run_label(OmegaConf.create(pl)) == "plackett_luce beta=0.1"
    ul = {"stage": "dpo", "loss": {"name": "unlikelihood", "alpha": 0.5}}
    assert run_label(OmegaConf.create(ul)) == "unlikelihood alpha=0.5"
    pft = {"stage": "dpo", "seed": 1, "beta": 0.1, "loss": {"name": "preferred_ft"}}
    assert run_label(OmegaConf.create(pft)) == "preferred_ft seed=1"
    assert run_label(OmegaConf.create({"stage": "sft", "loss": {"name": "sft"}})) == "sft"
    evaluation = {"stage": "eval", "run_name": "ckpt=a", "loss": {"name": "dpo", "beta": 0.1}}
    assert run_label(OmegaConf.create(evaluation)) == "eval ckpt=a"


def test_gather_points_one_row_per_eval_point(sweeps):
    rows = gather_points([sweeps[0].parent.parent])  # any parent works
    assert len(rows) == 9  # 3 runs x 3 eval points; beta=5 has none; train lines ignored
    assert all(list(row) == COLUMNS for row in rows)
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    expected = {
        "dpo beta=0.1": DPO_POINTS[0.1],
        "dpo beta=1": DPO_POINTS[1.0],
        "unlikelihood alpha=0.5": UNLIKELIHOOD_POINTS,
    }
    assert set(by_label) == set(expected)
    for label, points in expected.items():
        got = by_label[label]
        assert [(r["step"], r["kl"], r["reward"]) for r in got] == points
        assert [r["is_final"] for r in got] == [False, False, True]
        assert {r["method"] for r in got} == {label.split()[0]}
        assert got[1]["kl_se"] == pytest.approx(0.1 * points[1][1])
        assert got[1]["reward_se"] == 0.02
        assert got[1]["reward_delta"] == pytest.approx(points[1][2] - 0.21)
        assert got[1]["reward_delta_se"] == 0.01


def test_gather_points_best_of_n_lines(tmp_path):
    run_dir = tmp_path / "eval" / "bon"
    run_dir.mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"stage": "eval", "run_name": "bon", "loss": {"name": "sft"}}),
        run_dir / "config.yaml",
    )
    lines = [{"step": 0, "eval/kl": 1.0, "eval/reward": 0.3}]
    lines += [
        {"step": 0, "eval/bon_n": n, "eval/bon_kl": kl, "eval/bon_reward": r}
        for n, kl, r in [(4, 0.8, 0.5), (16, 1.9, 0.7)]
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = gather_points([run_dir])
    assert [(r["label"], r["method"], r["kl"], r["is_final"]) for r in rows] == [
        ("eval bon", "eval", 1.0, True),
        ("best-of-N N=4 of sft", "best-of-N", 0.8, True),  # no checkpoint=: drawn from the SFT model
        ("best-of-N N=16 of sft", "best-of-N", 1.9, True),
    ]
    assert rows[1]["reward_se"] is None and rows[1]["reward_delta"] is None


def test_write_frontier_csv_matches_rows(sweeps, tmp_path):
    rows = gather_points(sweeps)
    csv_path, png_path = write_frontier(
        rows, tmp_path / "out", "Reward vs KL frontier: x (sentiment, VADER reward)"
    )
    assert (csv_path, png_path) == (tmp_path / "out" / "frontier.csv", tmp_path / "out" / "frontier.png")
    back = read_csv(csv_path)
    assert len(back) == len(rows)
    for got, row in zip(back, rows, strict=True):
        assert list(got) == COLUMNS
        assert got["label"] == row["label"] and got["run_dir"] == row["run_dir"]
        assert int(got["step"]) == row["step"] and got["is_final"] == str(row["is_final"])
        assert float(got["kl"]) == pytest.approx(row["kl"])
        assert float(got["reward"]) == pytest.approx(row["reward"])
        assert float(got["reward_se"]) == pytest.approx(row["reward_se"])
    assert_png(png_path)


def callback_config(sweep_dir: Path, logger: str) -> dict:
    return {
        "exp_name": "x",
        "data": {"name": "sentiment"},
        "reward": {"name": "vader"},
        "logger": {"name": logger, "project": "dpo-cli-test", "entity": None, "mode": "offline"},
        "hydra": {"sweep": {"dir": str(sweep_dir)}},
    }


def test_callback_writes_frontier_into_sweep_dir(sweeps, capsys):
    dpo_sweep = sweeps[0]
    FrontierCallback().on_multirun_end(config=OmegaConf.create(callback_config(dpo_sweep, "none")))
    assert len(read_csv(dpo_sweep / "frontier.csv")) == 6
    assert_png(dpo_sweep / "frontier.png")
    out = capsys.readouterr().out
    assert f"frontier: wrote {dpo_sweep / 'frontier.csv'} and {dpo_sweep / 'frontier.png'}" in out
    assert "(6 points from 2 runs)" in out
    assert not (dpo_sweep / "wandb").exists()


def test_callback_without_points_does_nothing(tmp_path, capsys):
    FrontierCallback().on_multirun_end(config=OmegaConf.create(callback_config(tmp_path, "wandb")))
    assert "no eval points" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_callback_logs_to_wandb_offline(sweeps, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dpo_sweep = sweeps[0]
    FrontierCallback().on_multirun_end(config=OmegaConf.create(callback_config(dpo_sweep, "wandb")))
    assert (dpo_sweep / "frontier.csv").is_file()
    assert list((dpo_sweep / "wandb").glob("offline-run-*")), "no offline wandb run under the sweep dir"


def test_callback_logs_a_sweep_with_a_long_dir_name_to_wandb(sweeps, monkeypatch):
    """A sweep dir named by its overrides ran past wandb's 64-character tag limit: nothing was logged."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    long_dir = sweeps[0].with_name("multirun-loss-unlikelihood_loss.alpha-0.05,0.1,0.5,1_" + "x" * 20)
    sweeps[0].rename(long_dir)
    FrontierCallback().on_multirun_end(config=OmegaConf.create(callback_config(long_dir, "wandb")))
    assert list((long_dir / "wandb").glob("offline-run-*")), "no offline wandb run under the sweep dir"


def test_callback_in_a_real_hydra_multirun(tmp_path, monkeypatch, capsys):
    """Hydra resolves `${now:...}` in the callback to the same sweep dir the jobs were written to."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text(
        "exp_name: tiny\nstage: dpo\nrun_name: r\nseed: 0\nbeta: 0.1\n"
        "loss: {name: dpo, beta: '${beta}'}\n"
        "logger: {name: none, project: p, entity: null, mode: offline}\n"
        "root: ???\n"
        "hydra:\n"
        "  sweep:\n"
        "    dir: ${root}/multirun-${now:%H-%M-%S-%f}\n"  # microseconds: a re-resolved time would differ
        "    subdir: beta=${beta}\n"
        "  callbacks:\n"
        "    frontier:\n"
        "      _target_: dpo_cli.frontier.FrontierCallback\n"
    )

    def job(cfg):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        points = [(0, 0.0, 0.2), (10, 1.0 / cfg.beta, 0.2 + 0.1 / cfg.beta)]
        lines = [{"step": s, "eval/kl": kl, "eval/kl_se": 0.1, "eval/reward": r} for s, kl, r in points]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    argv = ["app", "-m", "beta=0.1,1", f"root={tmp_path / 'out'}"]
    monkeypatch.setattr(sys, "argv", argv + ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"])
    try:
        hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(job)()
    finally:
        GlobalHydra.instance().clear()
    (sweep_dir,) = (tmp_path / "out").glob("multirun-*")
    rows = read_csv(sweep_dir / "frontier.csv")
    assert sorted(r["label"] for r in rows if r["is_final"] == "True") == ["dpo beta=0.1", "dpo beta=1"]
    assert_png(sweep_dir / "frontier.png")
    assert "(4 points from 2 runs)" in capsys.readouterr().out


def test_plot_script_combines_sweeps(sweeps, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main([str(sweeps[0]), str(sweeps[1]), "--out", str(out), "--title", "DPO vs unlikelihood"]) == 0
    rows = read_csv(out / "frontier.csv")
    assert len(rows) == 9
    assert {r["label"] for r in rows} == {"dpo beta=0.1", "dpo beta=1", "unlikelihood alpha=0.5"}
    assert_png(out / "frontier.png")
    assert "(9 points from 3 runs)" in capsys.readouterr().out


def test_plot_script_without_points(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no eval points" in capsys.readouterr().out
