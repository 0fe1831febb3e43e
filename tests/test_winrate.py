"""`dpo-run winrate`: greedy sampling, baselines, winrate.csv/png, and end to end with a local fake judge."""

import csv
import json
import math

import pytest
from omegaconf import OmegaConf

from dpo_cli.cli import main
from dpo_cli.config import ModelConfig
from dpo_cli.errors import ConfigError
from dpo_cli.models import load_model
from dpo_cli.sampling import sample
from dpo_cli.stages.winrate import (
    baseline_text,
    dataset_baselines,
    gather_winrates,
    samples_file_baselines,
    write_winrate_csv,
    write_winrate_png,
)
from tests.conftest import write_jsonl
from tests.test_judge import FakeJudgeServer, serve


def test_temperature_zero_is_greedy_decoding():
    model, tokenizer = load_model(OmegaConf.structured(ModelConfig(name="tiny")), seed=0)
    prompts = ["The movie", "A story"]
    greedy = sample(model, tokenizer, prompts, num_samples=3, max_new_tokens=5, temperature=0.0, seed=1)
    again = sample(model, tokenizer, prompts, num_samples=3, max_new_tokens=5, temperature=0.0, seed=2)
    assert greedy.completion_ids == again.completion_ids  # no randomness, whatever the seed
    assert greedy.prompts == ["The movie"] * 3 + ["A story"] * 3
    assert len({tuple(ids) for ids in greedy.completion_ids[:3]}) == 1
    enc = tokenizer(["The movie"], return_tensors="pt")
    expected = model.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert (
        greedy.completion_ids[0]
        == expected[0, enc["input_ids"].shape[1] :].tolist()[: len(greedy.completion_ids[0])]
    )


def test_dataset_baseline_is_the_reference_of_each_record_kind():
    records = [
        {"prompt": "a", "completion": " demo"},
        {"prompt": "b", "chosen": " yes", "rejected": " no"},
        {"prompt": "c", "responses": [" worst", " best"], "ranking": [1, 0]},
        {"prompt": "a", "completion": " second demo of a"},
    ]
    prompts, baselines = dataset_baselines(records, num_prompts=2)
    assert prompts == ["a", "b"]
    assert [baseline_text(baselines, p, 0.0) for p in "abc"] == [" demo", " yes", " best"]


def test_samples_file_baseline_matches_the_temperature_when_it_can(tmp_path):
    path = write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {"temperature": 0.0, "prompt": "p", "completion": " cold"},
            {"temperature": 1.0, "prompt": "p", "completion": " hot"},
            {"temperature": 0.0, "prompt": "q", "completion": " only one"},
        ],
    )
    prompts, baselines = samples_file_baselines(path, num_prompts=10)
    assert prompts == ["p", "q"]
    assert baseline_text(baselines, "p", 1.0) == " hot" and baseline_text(baselines, "p", 0.5) == " cold"
    assert baseline_text(baselines, "q", 1.0) == " only one"


def test_winrate_csv_and_png_round_trip(tmp_path):
    rows = [
        {"label": label, "method": "policy", "temperature": t, "win_rate": rate, "ci_low": rate - 0.1,
         "ci_high": rate + 0.1, "judged": 10, "wins": 5, "losses": 4, "ties": 1, "unparseable": 0,
         "errors": 0, "checkpoint": "c", "baseline": "dataset:tldr", "judge": "fake"}
        for label, rate in (("dpo beta=0.5", 0.6), ("sft", 0.45))
        for t in (0.0, 0.5, 1.0)
    ]  # fmt: skip
    (tmp_path / "run").mkdir()
    write_winrate_csv(rows, tmp_path / "run" / "winrate.csv")
    png = write_winrate_png(rows, tmp_path / "run" / "winrate.png", "test")
    assert png.read_bytes()[:4] == b"\x89PNG"
    back = gather_winrates([tmp_path])
    assert [(r["label"], r["temperature"], r["win_rate"]) for r in back] == [
        (r["label"], r["temperature"], r["win_rate"]) for r in rows
    ]


def test_best_of_n_at_temperature_zero_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["winrate", "model=tiny", "method=best_of_n", "temperatures=[0.0,1.0]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "greedy" in err and "method=best_of_n" in err


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def tldr_sft_rows(n: int) -> list[dict]:
    """Rows in CarperAI/openai_summarize_tldr's schema."""
    return [
        {
            "prompt": f"SUBREDDIT: r/cats\nTITLE: Cat {i}\nPOST: My cat {i} naps.\nTL;DR:",
            "label": f" cat {i} naps",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tldr_sft_run(tmp_path_factory):
    """An SFT run of the tiny model on a local TL;DR copy; yields (output root, data file)."""
    root = tmp_path_factory.mktemp("winrate")
    data = write_jsonl(root / "tldr.jsonl", tldr_sft_rows(24))
    main(["sft", "model=tiny", "logger=none", f"output_root={root}", "data=tldr", f"data.path={data}",
          "trainer.max_steps=2", "trainer.batch_size_examples=4", "trainer.microbatch_size_examples=4",
          "eval.num_prompts=0", "data.max_eval_examples=4"])  # fmt: skip
    return root, data


@pytest.fixture
def position_biased_server():
    server = FakeJudgeServer(script=lambda number, body: (200, "The first reads better.\nPreferred: A", 0.0))
    httpd = serve(server)
    yield server
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_winrate_end_to_end_with_a_local_judge(tldr_sft_run, position_biased_server):
    root, data = tldr_sft_run
    server = position_biased_server
    argv = ["winrate", "model=tiny", "logger=none", f"output_root={root}", "data=tldr", f"data.path={data}",
            f"judge.base_url={server.url}", "judge.model=fake", "judge.backoff_seconds=0.01",
            "data.eval_fraction=0.25", "temperatures=[0.0,1.0]", "winrate.num_prompts=3",
            "winrate.max_new_tokens=4"]  # fmt: skip
    main([*argv, "run_name=first"])
    run_dir = root / "default" / "winrate" / "first"
    rows = list(csv.DictReader((run_dir / "winrate.csv").open()))
    assert [float(r["temperature"]) for r in rows] == [0.0, 1.0]
    # A judge that always picks the first position: both orders make every comparison a tie.
    assert all(float(r["win_rate"]) == 0.5 and r["ties"] == "3" and r["judged"] == "3" for r in rows)
    assert float(rows[0]["ci_low"]) < 0.5 < float(rows[0]["ci_high"])
    assert (run_dir / "winrate.png").read_bytes()[:4] == b"\x89PNG"
    judgments = [json.loads(line) for line in (run_dir / "judgments.jsonl").open()]
    assert len(judgments) == 6 and len(server.bodies) == 12
    assert judgments[0]["baseline"].startswith(" cat") and len(judgments[0]["answers"]) == 2
    assert judgments[0]["prompt"].endswith("\nTL;DR:") and judgments[0]["outcome"] == "tie"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [m["winrate/temperature"] for m in metrics] == [0.0, 1.0]

    # The same evaluation again: every answer comes from the cache in output_root.
    main([*argv, "run_name=second"])
    assert len(server.bodies) == 12
    again = list(csv.DictReader((root / "default" / "winrate" / "second" / "winrate.csv").open()))
    assert [r["win_rate"] for r in again] == [r["win_rate"] for r in rows]


@pytest.mark.slow
def test_best_of_n_head_to_head_against_another_runs_samples(tldr_sft_run):
    root, data = tldr_sft_run
    samples = write_jsonl(
        root / "other_samples.jsonl",
        [{"temperature": 1.0, "prompt": r["prompt"], "completion": " great"} for r in tldr_sft_rows(24)],
    )
    main(["winrate", "model=tiny", "logger=wandb", f"output_root={root}", "data=tldr", f"data.path={data}",
          "judge=reward", f"baseline={samples}", "method=best_of_n", "n=2", "temperatures=[1.0]",
          "winrate.num_prompts=4", "winrate.max_new_tokens=4", "run_name=bon"])  # fmt: skip
    run_dir = root / "default" / "winrate" / "bon"
    [row] = list(csv.DictReader((run_dir / "winrate.csv").open()))
    assert row["method"] == "best_of_2" and row["label"] == "best-of-2 sft" and row["judge"] == "reward:vader"
    assert int(row["wins"]) + int(row["losses"]) + int(row["ties"]) == 4
    assert not math.isnan(float(row["win_rate"]))
    judgments = [json.loads(line) for line in (run_dir / "judgments.jsonl").open()]
    assert {j["baseline"] for j in judgments} == {" great"}
    run_id = (run_dir / "wandb_run_id").read_text()  # every run's wandb files are in <output_root>/wandb
    assert list((root / "wandb").glob(f"offline-run-*-{run_id}/run-*.wandb"))


@pytest.mark.slow
def test_a_failed_winrate_overwrite_leaves_the_earlier_run_whole(tldr_sft_run, capsys):
    """Issue 22 (13): a failed `winrate overwrite=true` left the old winrate.csv, judgments.jsonl and
    winrate.png beside the new config and samples. Now the earlier run waits aside and comes back whole."""
    root, data = tldr_sft_run
    argv = ["winrate", "model=tiny", "logger=none", f"output_root={root}", "data=tldr", f"data.path={data}",
            "judge=reward", "temperatures=[1.0]", "winrate.num_prompts=2", "winrate.max_new_tokens=4",
            "run_name=replaced"]  # fmt: skip
    main(argv)
    run_dir = root / "default" / "winrate" / "replaced"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.suffix != ".log"}
    assert {"winrate.csv", "judgments.jsonl", "winrate.png", "samples.jsonl", "config.yaml"} <= set(before)
    # Samples are written, then no judge answers (nothing listens on port 9): the run fails.
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:6], "judge=openai", "judge.base_url=http://127.0.0.1:9/v1", "judge.max_retries=0",
              "temperatures=[0.5]", *argv[7:], "overwrite=true"])  # fmt: skip
    assert exit_info.value.code == 2 and "requests was answered" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.suffix != ".log"}
    assert after == before | {".lock": b""}
    assert not list(run_dir.glob(".previous-*"))


def test_a_bad_temperature_in_a_samples_file_is_one_line(tmp_path):
    """Issue 22 (14): a `temperature` that is not a number was a float() traceback."""
    path = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "p", "completion": "c", "temperature": "hot"}])
    with pytest.raises(
        ConfigError, match=f"{path} line 1: field 'temperature' must be a number >= 0, got 'hot'"
    ):
        samples_file_baselines(path, 4)
