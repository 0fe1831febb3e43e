"""Issue 21 (2, 12): sweep dirs named stably from the overrides, and a sweep that continues: finished
jobs skipped in one line each, a partial one resumed, new values run, frontier.csv over every job."""

import csv

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dpo_cli.cli import main, sweep_dir_name
from dpo_cli.config import conf_dir

TINY = ["model=tiny", "logger=none", "trainer.eval_every_steps=2", "data.max_eval_examples=16",
        "eval.num_prompts=2", "trainer.batch_size_examples=4",
        "trainer.microbatch_size_examples=2"]  # fmt: skip
EXCLUDE = list(OmegaConf.load(conf_dir() / "config.yaml").hydra.job.config.override_dirname.exclude_keys)


def name(*overrides: str) -> str:
    return sweep_dir_name(OverridesParser.create().parse_overrides(list(overrides)), EXCLUDE)


def test_a_sweep_dir_is_named_from_its_overrides_not_its_values():
    assert name("beta=0.05,0.1", "model=tiny", "stage=dpo") == "multirun-beta_model-tiny"
    # Other values of the same keys, resume=true and the logger: the same sweep dir.
    assert (
        name("model=tiny", "beta=1,5", "resume=true", "logger=none", "stage=dpo")
        == "multirun-beta_model-tiny"
    )
    assert name("lr=1e-5,1e-3", "seed=0,1", "stage=dpo") == "multirun-lr_seed"
    assert name("stage=dpo") == "multirun-default"
    # A path as a fixed value keeps the name pasteable as an override.
    swept = name("beta=0.1,1", "data=jsonl", "data.path=/data/my pairs.jsonl", "stage=dpo")
    assert "=" not in swept and "," not in swept and " " not in swept
    OverridesParser.create().parse_overrides([f"sft_checkpoint=outputs/x/dpo/{swept}/beta-0.1/final"])


@pytest.mark.slow
def test_an_interrupted_sweep_continues_where_it_stopped(tmp_path, capsys):
    main(["sft", *TINY, f"output_root={tmp_path}", "trainer.max_steps=2", "run_name=sft"])
    sweep = [
        "-m",
        "dpo",
        *TINY,
        f"output_root={tmp_path}",
        "trainer.max_steps=4",
        "trainer.save_every_steps=2",
    ]
    main([*sweep, "beta=0.1,1"])
    [sweep_dir] = (tmp_path / "default" / "dpo").glob("multirun-*")
    jobs = {job.name.split("_")[0]: job for job in sweep_dir.iterdir() if (job / "config.yaml").is_file()}
    assert set(jobs) == {"beta-0.1", "beta-1"}
    # beta=1 "was killed" after its step-2 checkpoint: no final/.
    import shutil

    shutil.rmtree(jobs["beta-1"] / "final")
    capsys.readouterr()

    main([*sweep, "beta=0.1,1,5", "resume=true"])
    out = capsys.readouterr().out
    assert f"resume: skipping {jobs['beta-0.1']}: finished already (final/ exists)" in out
    assert f"resume: from {jobs['beta-1'] / 'checkpoints' / 'step-2'} (step 2)" in out
    assert "resume: no checkpoint in" in out  # beta=5, new
    assert [p.name for p in (tmp_path / "default" / "dpo").glob("multirun-*")] == [sweep_dir.name]
    assert all((job / "final").is_dir() for job in sweep_dir.iterdir() if (job / "config.yaml").is_file())
    rows = list(csv.DictReader((sweep_dir / "frontier.csv").open()))
    finals = sorted(r["label"] for r in rows if r["is_final"] == "True")
    assert finals == ["dpo beta=0.1", "dpo beta=1", "dpo beta=5"]
    assert f"next: dpo-run runs {sweep_dir}" in out
    assert "next: dpo-run -m dpo" not in out  # a job of a sweep does not suggest starting a sweep
