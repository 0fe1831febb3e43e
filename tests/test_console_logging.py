"""Issue 21 (10, 11): a quiet console with a closing summary; wandb groups, job types and tags; TensorBoard
as a second logger."""

import sys
import types
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dpo_cli.config import conf_dir
from dpo_cli.engine import rundir
from dpo_cli.logging import RunLogger, closing_summary, quiet_console, wandb_group


def config(tmp_path: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"output_root={tmp_path}", "model=tiny",
                                                       "stage=dpo", "run_name=r"])  # fmt: skip
    GlobalHydra.instance().clear()
    return cfg


def test_the_closing_summary_compares_the_first_and_last_eval_point():
    metrics = [
        {"step": 0, "eval/loss": 0.693, "eval/rewards/accuracies": 0.5},
        {"step": 0, "eval/reward": 0.14, "eval/kl": 0.0},
        {"step": 40, "train/loss": 0.4},
        {
            "step": 80,
            "eval/loss": 0.55,
            "eval/rewards/accuracies": 0.709,
            "eval/reward": 0.657,
            "eval/kl": 9.419,
        },
    ]
    assert closing_summary(metrics) == (
        "summary: step 0 -> 80: reward 0.140 -> 0.657, KL 0.000 -> 9.419, accuracy 0.500 -> 0.709, "
        "loss 0.693 -> 0.550"
    )
    assert closing_summary([{"step": 1, "train/loss": 0.1}]) is None


def test_quiet_console_silences_transformers():
    import transformers

    quiet_console(verbose=False)
    assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
    assert not transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()


class FakeWandb(types.ModuleType):
    """Records wandb.init's arguments (the real one needs no account offline, but takes seconds)."""

    def __init__(self):
        super().__init__("wandb")
        self.init_kwargs = {}
        self.Settings = lambda **kwargs: kwargs

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return types.SimpleNamespace(
            url=None,
            dir=f"{kwargs['dir']}/wandb/offline-run-x/files",
            log=lambda *a, **k: None,
            finish=lambda: None,
        )


def test_wandb_gets_job_type_tags_provenance_and_one_dir_and_tensorboard_runs_beside(
    tmp_path, monkeypatch, capsys
):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = config(tmp_path, "logger=wandb_tensorboard", "logger.mode=offline")
    origin = {"reference": {"path": "/sft/final", "fingerprint": "ab", "trained_on": None}, "data": {}}
    logger = RunLogger(cfg, tmp_path / "run", origin)
    logger.log({"eval/kl": 1.5, "eval/reward": 0.3}, step=2)
    logger.close()
    kwargs = fake.init_kwargs
    assert kwargs["group"] == "default" and kwargs["job_type"] == "dpo"  # a single run: its experiment
    assert kwargs["tags"] == ["dpo", "model:tiny", "data:sentiment", "loss:dpo"]
    assert kwargs["config"]["provenance"] == origin and "judge" not in kwargs["config"]
    assert kwargs["dir"] == str(tmp_path)  # every run's offline files in <output_root>/wandb
    assert kwargs["settings"] == {"quiet": True}
    assert f"wandb: offline: `wandb sync {tmp_path}/wandb/offline-run-x`" in capsys.readouterr().out
    [events] = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/kl")] == [(2, 1.5)]


def test_logger_tensorboard_alone_starts_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail
    logger = RunLogger(config(tmp_path, "logger=tensorboard"), tmp_path / "run")
    logger.log({"train/loss": 0.7}, step=1)
    logger.close()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_sweep_is_its_own_wandb_group_named_from_its_overrides(tmp_path):
    cfg = config(tmp_path)
    assert wandb_group(cfg, tmp_path / "default" / "dpo" / "multirun-beta_model-tiny") == (
        "default/dpo/multirun-beta_model-tiny"
    )


def test_finish_lists_no_empty_log_and_prints_the_summary(tmp_path, capsys):
    (tmp_path / "cli.log").write_text("")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/kl": 0.0}\n{"step": 4, "eval/kl": 2.0}\n')
    rundir.finish(tmp_path, "dpo-run plot outputs", "why", carry_overrides=False)
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/: metrics.jsonl" in out and "cli.log" not in out
    assert "summary: step 0 -> 4: KL 0.000 -> 2.000" in out
    assert "next: dpo-run plot outputs   (why)" in out


@pytest.mark.parametrize("stage", ["sft", "dpo", "eval", "winrate"])
def test_next_hints_name_installed_commands(stage):
    source = (Path(rundir.__file__).parents[1] / "stages" / f"{stage}.py").read_text()
    assert "scripts/plot_" not in source


def test_a_sweep_tag_fits_wandbs_64_characters(tmp_path):
    from dpo_cli.logging import wandb_tags

    cfg = config(tmp_path)
    long_group = "default/dpo/multirun-beta_" + "trainer.eval_every_steps-2_" * 5
    tags = wandb_tags(cfg, long_group)
    assert all(len(tag) <= 64 for tag in tags) and tags[-1].startswith("sweep:multirun-beta_trainer.")
    assert wandb_tags(cfg, "default/dpo/multirun-beta")[-1] == "sweep:multirun-beta"


@pytest.mark.slow
def test_a_redirected_log_has_eval_lines_and_a_summary_and_no_bars(tmp_path):
    """Issue 21 (10): nested tqdm bars wrote carriage-return escapes into redirected logs."""
    import os
    import subprocess

    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    argv = ["sft", "model=tiny", "logger=none", f"output_root={tmp_path}", "trainer.max_steps=2",
            "trainer.eval_every_steps=1", "eval.num_prompts=2", "data.max_eval_examples=8"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "dpo_cli.cli", *argv], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "\r" not in log and "it/s" not in log and "step/s" not in log
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("step ")] == [
        "step 1",
        "step 2",
    ]
    assert "summary: step 0 -> 2: reward" in done.stdout
