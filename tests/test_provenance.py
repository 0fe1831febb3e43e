"""Issue 21 (1, 6, 9, 12): which models a run started from, recorded; the SFT checkpoint of the same data;
prefs' model; what overwrite moves aside; run-dir paths that paste back into overrides."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dpo_cli.cli import main
from dpo_cli.config import conf_dir, run_dir_name
from dpo_cli.reference import checkpoint_fingerprint
from tests.conftest import write_jsonl

TINY = ["model=tiny", "logger=none", "trainer.eval_every_steps=2", "data.max_eval_examples=16",
        "eval.num_prompts=0", "trainer.batch_size_examples=4", "trainer.microbatch_size_examples=2",
        "trainer.max_steps=1"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny", "trainer.max_steps=2"],
        ["data=jsonl", "data.path=/data/my pairs.jsonl", "eval.best_of_n=[1,4]", "beta=-1"],
        ["run_name=x", "lr=1e-5", "judge.base_url='http://a:1/v1'", "temperatures=[0.0,1.0]"],
        [f"checkpoint=/{'long/' * 40}final", "eval.seed=3"],  # cut, with a hash of the whole
        [],
    ],
)
def test_a_run_dir_name_pastes_back_into_an_override(overrides):
    """Issue 21 (12): `outputs/wr/sft/model=tiny,trainer.max_steps=2/final` broke Hydra's grammar."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "stage=sft"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    name = run_dir_name(cfg.hydra.job.override_dirname)
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name), name
    for key in ("checkpoint", "sft_checkpoint", "baseline"):
        [parsed] = OverridesParser.create().parse_overrides([f"{key}=outputs/default/sft/{name}/final"])
        assert parsed.value() == f"outputs/default/sft/{name}/final"
    assert len(name) <= 120
    if overrides[:1] == ["model=tiny"]:
        assert name == "model-tiny_trainer.max_steps-2"


def written_dir(out: str) -> Path:
    [line] = [line for line in out.splitlines() if line.startswith("wrote ")]
    return Path(line.removeprefix("wrote ").split("/: ")[0])


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two SFT runs of the tiny model: one on a pairs file (made first), one on the sentiment data."""
    root = tmp_path_factory.mktemp("provenance")
    rows = [{"prompt": f"Review {i}:", "chosen": " great fun", "rejected": " dull"} for i in range(40)]
    pairs = write_jsonl(root / "pairs.jsonl", rows)
    main(["sft", *TINY, f"output_root={root}", "data=jsonl", f"data.path={pairs}", "run_name=on_pairs"])
    main(["sft", *TINY, f"output_root={root}", "run_name=on_sentiment"])
    return root, pairs, root / "default" / "sft"


@pytest.mark.slow
def test_dpo_picks_the_sft_run_of_its_data_and_records_it(sft_runs, capsys):
    root, pairs, sft = sft_runs
    capsys.readouterr()
    main(["dpo", *TINY, f"output_root={root}", "data=jsonl", f"data.path={pairs}", "run_name=dpo"])
    out = capsys.readouterr().out
    final = (sft / "on_pairs" / "final").resolve()
    fingerprint = checkpoint_fingerprint(final)
    assert f"dpo: policy init and reference = {sft / 'on_pairs' / 'final'} (sha256 {fingerprint[:12]}" in out
    config = OmegaConf.to_container(OmegaConf.load(root / "default" / "dpo" / "dpo" / "config.yaml"))
    for model in ("policy_init", "reference"):
        assert config["provenance"][model]["path"] == str(final)
        assert config["provenance"][model]["fingerprint"] == fingerprint
        trained = config["provenance"][model]["trained_on"]
        assert trained["stage"] == "sft" and trained["data"] == {"name": "jsonl", "path": str(pairs)}
    assert config["provenance"]["data"] == {"name": "jsonl", "path": str(pairs)}
    # What dpo does not read is not in its config.
    assert "judge" not in config and "winrate" not in config and "prefs" not in config


@pytest.mark.slow
def test_dpo_on_data_no_sft_run_saw_says_so_in_one_line(sft_runs, capsys):
    root, pairs, sft = sft_runs
    other = write_jsonl(root / "other.jsonl", [json.loads(line) for line in pairs.read_text().splitlines()])
    capsys.readouterr()
    main(["dpo", *TINY, f"output_root={root}", "data=jsonl", f"data.path={other}", "run_name=other"])
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sft_checkpoint:")]
    assert f"no SFT run on data name=jsonl,path={other}" in line
    assert "using " in line and "set sft_checkpoint=PATH to choose" in line


@pytest.mark.slow
def test_paths_the_tool_prints_work_as_overrides(sft_runs, capsys):
    """Issue 21 (12): the printed run dir, passed back as checkpoint= / sft_checkpoint= / baseline=."""
    root, _, _ = sft_runs
    capsys.readouterr()
    main(["sft", *TINY, f"output_root={root}", "exp_name=paste", "lr=1e-5"])
    sft_dir = written_dir(capsys.readouterr().out)
    assert "=" not in sft_dir.name and "," not in sft_dir.name and "lr-1e-5" in sft_dir.name
    main(["eval", *TINY, f"output_root={root}", "exp_name=paste", f"checkpoint={sft_dir}/final",
          "eval.num_prompts=1", "eval.best_of_n=[]"])  # fmt: skip
    eval_dir = written_dir(capsys.readouterr().out)
    assert (eval_dir / "metrics.jsonl").is_file()
    main(["dpo", *TINY, f"output_root={root}", "exp_name=paste", f"sft_checkpoint={sft_dir}/final"])
    assert (written_dir(capsys.readouterr().out) / "final").is_dir()
    main(["winrate", *TINY, f"output_root={root}", "exp_name=paste", f"baseline={eval_dir}/samples.jsonl",
          f"checkpoint={sft_dir}/final", "--cfg", "job"])  # fmt: skip
    assert f"baseline: {eval_dir}/samples.jsonl" in capsys.readouterr().out


@pytest.mark.slow
def test_prefs_reads_checkpoint_and_says_what_it_sampled(sft_runs, capsys):
    """Issue 21 (6): `dpo-run prefs checkpoint=DIR` was ignored without a word."""
    root, _, sft = sft_runs
    final = sft / "on_pairs" / "final"
    args = ["prefs", "model=tiny", f"output_root={root}", "prefs.max_prompts=2", "prefs.num_samples=2",
            "prefs.max_new_tokens=2"]  # fmt: skip
    capsys.readouterr()
    main([*args, f"checkpoint={final}", "run_name=p"])
    assert f"prefs: sampling from {final.resolve()}" in capsys.readouterr().out
    config = OmegaConf.load(root / "default" / "prefs" / "p" / "config.yaml")
    assert config.provenance.sampled_from.fingerprint == checkpoint_fingerprint(final)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"checkpoint={final}", f"sft_checkpoint={sft / 'on_sentiment' / 'final'}", "run_name=q"])
    assert exit_info.value.code == 2 and "prefs samples from one model" in capsys.readouterr().err


@pytest.mark.slow
def test_overwrite_says_what_it_moves_aside(sft_runs, capsys):
    """Issue 21 (9): overwrite=true deleted the earlier run without saying so."""
    root, _, sft = sft_runs
    capsys.readouterr()
    main(["sft", *TINY, f"output_root={root}", "run_name=on_sentiment", "overwrite=true"])
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("overwrite:")]
    assert "moved the earlier run (config.yaml, final/, metrics.jsonl" in line
    assert (
        f"aside to {sft / 'on_sentiment' / '.previous-'}" in line and "removed once this run finishes" in line
    )
