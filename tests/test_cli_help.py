"""Issue 21 (5): per-stage help from the schema, Hydra's own help, shell completion."""

import os
import re
import sys

import pytest

from dpo_cli.cli import STAGES, help_text, main, stage_help
from dpo_cli.config import STAGE_READS, field_docs


def test_a_stage_help_lists_its_keys_with_type_default_and_meaning(capsys):
    main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert out != help_text() + "\n"
    # This stage's default (conf/stage/dpo.yaml sets lr 2e-5), the type and the docstring's first sentence.
    assert "  lr (float = 2e-05): Peak learning rate after warm-up." in out
    assert "  trainer.max_steps (int | None = 80): Optimizer steps to train for;" in out
    assert "  sft_checkpoint (str | None = null): Policy init and reference model" in out
    # Keys only winrate reads are not dpo's.
    assert "judge." not in out and "temperatures" not in out and "winrate." not in out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_key_a_stage_shows_has_a_description(stage):
    lines = [line for line in stage_help(stage).splitlines() if line.startswith("  ")]
    assert lines
    for line in lines:
        assert re.match(r"  [\w.]+ \(.+ = .*\): \S", line), line


def test_winrate_help_shows_the_judge_and_eval_help_does_not():
    assert "judge.base_url" in stage_help("winrate") and "judge.base_url" not in stage_help("eval")
    assert set(STAGE_READS) == set(STAGES)


def test_field_docs_are_read_from_the_schema():
    docs = field_docs()
    assert docs["TrainerConfig", "max_steps"].startswith("Optimizer steps to train for")
    assert docs["JudgeConfig", "model"] == "Judge model name as the server knows it."


def run(argv: list[str]) -> None:
    """main(argv), which Hydra's flags end with a SystemExit of 0."""
    try:
        main(argv)
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)


def test_hydra_help_prints_hydras_help(capsys, monkeypatch):
    """`dpo-run dpo --hydra-help`, which `--help` recommends, was a traceback."""
    monkeypatch.setattr(sys, "argv", ["dpo-run"])
    run(["dpo", "--hydra-help"])
    assert "Hydra (" in capsys.readouterr().out


def test_shell_completion_installs_and_completes_stages_and_keys(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dpo-run"])
    run(["-sc", "install=bash"])
    assert "complete -o nospace -o default -F hydra_bash_completion dpo-run" in capsys.readouterr().out
    monkeypatch.setenv("COMP_LINE", "dpo-run d")
    run(["-sc", "query=bash"])
    assert capsys.readouterr().out.split() == ["dpo"]
    monkeypatch.setenv("COMP_LINE", "dpo-run dpo model=tiny trainer.max_st")
    run(["-sc", "query=bash"])
    assert "trainer.max_steps=" in capsys.readouterr().out.split()
    monkeypatch.setenv("COMP_LINE", "dpo-run eval logger=")
    run(["-sc", "query=bash"])
    assert {"logger=none", "logger=tensorboard", "logger=wandb_tensorboard"} <= set(
        capsys.readouterr().out.split()
    )
    assert os.environ["COMP_LINE"].startswith("dpo-run stage=eval")


def test_cfg_job_prints_the_stages_keys_only(capsys):
    """Issue 21 (5): every stage's config showed the win-rate keys."""
    main(["eval", "model=tiny", "--cfg", "job"])
    out = capsys.readouterr().out
    assert "stage: eval" in out and "checkpoint: null" in out and "best_of_n:" in out
    assert "judge:" not in out and "winrate:" not in out and "prefs:" not in out and "loss:" not in out
