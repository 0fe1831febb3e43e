"""`dpo-run sft` then `dpo-run dpo` end to end on the random tiny model, asserting on what they write."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_cli.cli import main
from dpo_cli.logging import read_metrics

pytestmark = pytest.mark.slow
TINY = [
    "model=tiny",
    "logger=none",
    "trainer.eval_every_steps=2",
    "data.max_eval_examples=16",
    "eval.num_prompts=4",
]


def run(*argv: str) -> None:
    main(list(argv))


def only_run_dir(root: Path) -> Path:
    [metrics] = list(root.rglob("metrics.jsonl"))
    return metrics.parent


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """One SFT run on the embedded sentiment data, shared by the DPO tests of this module."""
    root = tmp_path_factory.mktemp("runs")
    run(
        "sft",
        *TINY,
        f"output_root={root}",
        "trainer.max_steps=4",
        "trainer.batch_size_examples=8",
        "trainer.microbatch_size_examples=4",
        "lr=1e-3",
    )
    return root


def test_sft_writes_a_loadable_checkpoint_and_metrics(sft_run):
    run_dir = only_run_dir(sft_run / "default" / "sft")
    assert {"config.yaml", "metrics.jsonl", "final"} <= {p.name for p in run_dir.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    out = model.generate(**tokenizer("The movie", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(tokenizer("The movie")["input_ids"]) + 3

    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(math.isfinite(m["train/loss"]) for m in train)
    # Byte-level tiny model at random init: loss ~ log(vocab = 259); lr 1e-3 brings it down within 4 steps.
    assert train[0]["train/loss"] == pytest.approx(math.log(259), abs=0.5)
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert [m["step"] for m in metrics if "eval/loss" in m] == [0, 2, 4]
    assert train[-1]["train/examples"] == 4 * 8


def test_dpo_starts_from_sft_and_logs_the_papers_metrics(sft_run):
    run("dpo", *TINY, f"output_root={sft_run}", "trainer.max_steps=3", "beta=0.1")
    run_dir = only_run_dir(sft_run / "default" / "dpo")
    metrics = read_metrics(run_dir)
    step0 = next(m for m in metrics if m["step"] == 0)
    # At step 0 the policy is the SFT model, which is also the reference: every reward is 0, loss is log 2.
    assert step0["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step0["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    last_train = [m for m in metrics if "train/loss" in m][-1]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "examples_per_second",
    ):
        assert math.isfinite(last_train[f"train/{key}"]), key
    sft_final = only_run_dir(sft_run / "default" / "sft") / "final"
    sft_weights = AutoModelForCausalLM.from_pretrained(sft_final).state_dict()
    dpo_weights = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert any(not torch.equal(sft_weights[k], dpo_weights[k]) for k in sft_weights)
    config = (run_dir / "config.yaml").read_text()
    assert "beta: 0.1" in config and "name: dpo" in config


def test_multirun_sweep_gives_one_run_dir_per_beta(sft_run):
    run(
        "-m", "dpo", *TINY, f"output_root={sft_run}", "exp_name=default", "beta=0.05,5", "trainer.max_steps=2"
    )
    [sweep] = (sft_run / "default" / "dpo").glob("multirun-*")
    runs = sorted(p.parent for p in sweep.rglob("metrics.jsonl"))
    assert len(runs) == 2
    assert sorted(OmegaConf.load(r / "config.yaml").beta for r in runs) == [0.05, 5.0]


def test_sweep_ends_with_a_frontier_and_wandb_has_the_points(sft_run):
    run(
        "-m",
        "dpo",
        *TINY,
        "logger=wandb",
        f"output_root={sft_run}",
        "exp_name=default",
        "beta=0.1,1",
        "trainer.max_steps=2",
        "run_name=frontier_${beta}",
    )
    [sweep] = [p for p in (sft_run / "default" / "dpo").glob("multirun-*") if (p / "frontier_0.1").is_dir()]
    rows = list(csv.DictReader((sweep / "frontier.csv").open()))
    # Two runs x eval points at steps 0 and 2.
    assert sorted((r["label"], int(r["step"])) for r in rows) == [
        ("dpo beta=0.1", 0),
        ("dpo beta=0.1", 2),
        ("dpo beta=1", 0),
        ("dpo beta=1", 2),
    ]
    assert all(float(r["kl"]) == 0.0 for r in rows if r["step"] == "0")  # step 0: the policy is the reference
    assert (sweep / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    for job in ("frontier_0.1", "frontier_1.0"):
        run_id = (sweep / job / "wandb_run_id").read_text()  # wandb files: <output_root>/wandb
        [wandb_log] = (sft_run / "wandb").glob(f"offline-run-*-{run_id}/run-*.wandb")
        assert b"eval/kl" in wandb_log.read_bytes() and b"eval/reward" in wandb_log.read_bytes()
        samples = [json.loads(line) for line in (sweep / job / "samples.jsonl").open()]
        assert {s["step"] for s in samples} == {0, 2} and len(samples) == 2 * 4 * 4


def test_eval_stage_writes_a_point_and_best_of_n(sft_run):
    run("eval", *TINY, f"output_root={sft_run}", "eval.best_of_n=[1,4]", "run_name=sft_point")
    metrics = read_metrics(sft_run / "default" / "eval" / "sft_point")
    assert metrics[0]["eval/kl"] == 0.0  # the SFT model against itself
    assert [m["eval/bon_n"] for m in metrics[1:]] == [1, 4]
    assert metrics[2]["eval/bon_kl"] == pytest.approx(math.log(4) - 3 / 4)


def test_dpo_without_sft_checkpoint_says_what_to_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("dpo", *TINY, f"output_root={tmp_path}", "exp_name=nothing_here")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dpo-run sft exp_name=nothing_here model=tiny" in err and "sft_checkpoint=" in err


def test_rerun_into_the_same_run_dir_refuses(sft_run, capsys):
    argv = ["dpo", *TINY, f"output_root={sft_run}", "trainer.max_steps=1", "run_name=twice"]
    run(*argv)
    metrics_before = (sft_run / "default/dpo/twice/metrics.jsonl").read_text()
    with pytest.raises(SystemExit):
        run(*argv)
    assert "overwrite=true" in capsys.readouterr().err
    assert (sft_run / "default/dpo/twice/metrics.jsonl").read_text() == metrics_before


@pytest.mark.parametrize("loss", ["dpo", "ipo", "cdpo", "preferred_ft", "unlikelihood", "plackett_luce"])
def test_every_loss_trains_on_the_embedded_data(sft_run, loss):
    run("dpo", *TINY, f"output_root={sft_run}", f"loss={loss}", "trainer.max_steps=2", f"run_name={loss}")
    metrics = read_metrics(sft_run / "default" / "dpo" / loss)
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2]
    assert all(math.isfinite(v) for m in metrics for k, v in m.items() if k != "step")


def test_jsonl_files_of_each_record_kind(tmp_path, sft_file, pair_file, ranked_file):
    common = [
        *TINY,
        f"output_root={tmp_path}",
        "data=jsonl",
        "trainer.max_steps=2",
        "trainer.batch_size_examples=4",
        "trainer.microbatch_size_examples=4",
    ]
    run("sft", *common, f"data.path={sft_file}", "run_name=sft")
    run("dpo", *common, f"data.path={pair_file}", "run_name=pairs")
    run("dpo", *common, f"data.path={ranked_file}", "loss=plackett_luce", "run_name=ranked")
    for name, stage in (("sft", "sft"), ("pairs", "dpo"), ("ranked", "dpo")):
        run_dir = tmp_path / "default" / stage / name
        assert (run_dir / "final" / "model.safetensors").is_file()
        assert any("train/loss" in m for m in read_metrics(run_dir))


def test_dpo_learns_a_consistent_preference(tmp_path, pair_file):
    """On pairs that always prefer one completion, DPO must raise accuracy and margins within a few steps."""
    common = [
        *TINY,
        f"output_root={tmp_path}",
        "data=jsonl",
        f"data.path={pair_file}",
        "trainer.batch_size_examples=8",
        "trainer.microbatch_size_examples=8",
        "trainer.lr_warmup_steps=0",
    ]
    run("sft", *common, "trainer.max_steps=2", "run_name=sft")
    run("dpo", *common, "trainer.max_steps=15", "lr=3e-3", "trainer.optimizer=adamw", "run_name=learn")
    train = [m for m in read_metrics(tmp_path / "default/dpo/learn") if "train/loss" in m]
    assert train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert train[-1]["train/rewards/accuracies"] == 1.0
    assert train[-1]["train/rewards/margins"] > train[0]["train/rewards/margins"] + 0.1
    assert train[-1]["train/loss"] < 0.6


def test_one_sweep_puts_dpo_simpo_orpo_and_kto_on_one_frontier(sft_run):
    run(
        "-m",
        "dpo",
        *TINY,
        f"output_root={sft_run}",
        "exp_name=default",
        "loss=dpo,simpo,orpo,kto",
        "trainer.max_steps=2",
        "run_name=menu_${loss.name}",
    )
    [sweep] = [p for p in (sft_run / "default" / "dpo").glob("multirun-*") if (p / "menu_kto").is_dir()]
    rows = list(csv.DictReader((sweep / "frontier.csv").open()))
    assert sorted({r["label"] for r in rows}) == [
        "dpo beta=0.1",
        "kto beta=0.1",
        "orpo beta=0.1",
        "simpo beta=0.1",
    ]
    assert sorted(int(r["step"]) for r in rows) == [0, 0, 0, 0, 2, 2, 2, 2]
    kto = read_metrics(sweep / "menu_kto")
    assert all(
        0 < m["train/desirable_fraction"] < 1 and m["train/kto_z0"] >= 0 for m in kto if "train/loss" in m
    )
    for loss in ("simpo", "orpo"):  # reference-free: the batches carry no reference log-probs
        train = [m for m in read_metrics(sweep / f"menu_{loss}") if "train/loss" in m]
        assert all(m["train/forward_sequences_per_pair"] <= 2 for m in train)
        assert all(math.isfinite(m["train/loss"]) for m in train)
