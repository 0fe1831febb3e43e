"""Crash-safe resume, non-finite losses, Ctrl-C, and bad input that never costs the user anything."""

import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_cli import checkpoints
from dpo_cli.cli import main
from dpo_cli.errors import RunStopped
from dpo_cli.logging import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow
# Enough steps that a kill lands mid-run; checkpoints every 3 steps; frontier sampling on (it uses RNG).
TINY = ["model=tiny", "logger=none", "trainer.eval_every_steps=10", "data.max_eval_examples=16",
        "eval.num_prompts=2", "trainer.batch_size_examples=4", "trainer.microbatch_size_examples=2",
        "trainer.save_every_steps=3", "trainer.keep_checkpoints=2", "model.tiny_hidden_size=64",
        "model.tiny_num_layers=4"]  # fmt: skip
TIMING_KEYS = ("train/examples_per_second",)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def comparable_metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in read_metrics(run_dir)]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = weights(resumed), weights(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comparable_metrics(resumed) == comparable_metrics(uninterrupted)
    samples = [(resumed / "samples.jsonl").read_text(), (uninterrupted / "samples.jsonl").read_text()]
    assert samples[0] == samples[1]


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "dpo_cli.cli", *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(line).get("step", -1) >= step and "train/loss" in line
            for line in metrics.read_text().splitlines()
            if line.endswith("}")
        ):
            return
        if process.poll() is not None:
            pytest.fail(f"run ended before step {step}: {process.stderr.read()}")
        time.sleep(0.01)
    pytest.fail(f"no step {step} within {timeout_s}s")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An SFT run to start preference runs from, and an uninterrupted reference run of each stage."""
    root = tmp_path_factory.mktemp("reliability")
    main(["sft", *TINY, f"output_root={root}", "trainer.max_steps=30", "run_name=full"])
    main(["dpo", *dpo_args(root), "trainer.max_steps=30", "run_name=full"])
    return root


def dpo_args(root: Path) -> list[str]:
    """DPO runs start from the reference SFT run explicitly (the resumed SFT run would be found first)."""
    return [*TINY, f"output_root={root}", f"sft_checkpoint={root / 'default/sft/full/final'}"]


@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_sigkill_then_resume_is_bit_identical(root, stage):
    common = dpo_args(root) if stage == "dpo" else [*TINY, f"output_root={root}"]
    argv = [stage, *common, "trainer.max_steps=30", "run_name=killed"]
    run_dir = root / "default" / stage / "killed"
    kill_after = random.Random(stage).randint(7, 20)
    process = start(argv, cwd=root)
    wait_for_step(process, run_dir, kill_after)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (run_dir / "final").exists()
    assert checkpoints.latest_resumable(run_dir) is not None

    main([*argv, "resume=true"])
    assert_same_run(run_dir, root / "default" / stage / "full")


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(root, monkeypatch):
    argv = ["dpo", *dpo_args(root), "trainer.max_steps=30", "run_name=killed_mid_write"]
    run_dir = root / "default" / "dpo" / "killed_mid_write"

    class Killed(BaseException):
        """Stands in for SIGKILL: nothing after it runs, no handler catches it."""

    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "step-9":
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", replace)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert (run_dir / "checkpoints" / ".tmp-step-9").is_dir()  # the half-written one, never picked up
    assert checkpoints.latest_resumable(run_dir).name == "step-6"

    main([*argv, "resume=true"])
    assert_same_run(run_dir, root / "default" / "dpo" / "full")
    # keep_checkpoints=2: only the two newest complete checkpoints remain.
    assert [p.name for p in checkpoints.resumable_checkpoints(run_dir)] == ["step-24", "step-27"]


@pytest.mark.parametrize(("signum", "name"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(root, signum, name):
    """Issue 22 (5): SIGTERM, what Slurm and Kubernetes send before a kill, exited at once with 143 and no
    checkpoint; now it stops as Ctrl-C does."""
    argv = ["dpo", *dpo_args(root), "trainer.max_steps=30", f"run_name=interrupted_{signum.name}"]
    run_dir = root / "default" / "dpo" / f"interrupted_{signum.name}"
    process = start(argv, cwd=root)
    wait_for_step(process, run_dir, 5)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 1
    err = process.stderr.read()
    assert f"interrupted ({name}): saved" in err and "resume=true" in err
    assert checkpoints.latest_resumable(run_dir) is not None
    main([*argv, "resume=true"])
    assert_same_run(run_dir, root / "default" / "dpo" / "full")


def test_non_finite_loss_stops_with_the_step_examples_and_last_checkpoint(root, capsys):
    # lr 1e30 blows the weights up in the first update, so step 2's loss or gradient is not finite.
    argv = ["dpo", *dpo_args(root), "trainer.max_steps=6", "lr=1e30", "trainer.lr_warmup_steps=0",
            "eval.num_prompts=0"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "run_name=nan_stop"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"step 2: the (loss|gradient norm) is not finite on training examples \[\d+, \d+\]", err)
    assert "last good checkpoint: none" in err and "trainer.nan_policy=skip_batch" in err

    main([*argv, "run_name=nan_skip", "trainer.nan_policy=skip_batch"])
    last = [m for m in read_metrics(root / "default" / "dpo" / "nan_skip") if "train/skipped_batches" in m][
        -1
    ]
    assert last["step"] == 6 and last["train/skipped_batches"] == 5


def unfinished_run(root: Path, name: str, max_steps: int) -> tuple[list[str], Path]:
    """A DPO run of `max_steps` whose final/ is removed: as if killed after its last log line."""
    argv = ["dpo", *dpo_args(root), f"trainer.max_steps={max_steps}", f"run_name={name}"]
    main(argv)
    run_dir = root / "default" / "dpo" / name
    shutil.rmtree(run_dir / "final")
    return argv, run_dir


def test_resume_refuses_a_changed_config_naming_the_keys(root, capsys):
    """Issue 22 (3): resume=true with another beta or data continued and rewrote config.yaml."""
    argv, run_dir = unfinished_run(root, "changed", max_steps=4)  # a checkpoint at step 3
    config = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    fails([*argv, "resume=true", "beta=0.2", "data.eval_fraction=0.2"], capsys,
          "beta=0.1 (now 0.2)", "data.eval_fraction=0.1 (now 0.2)",
          "only run_name, trainer.max_steps")  # fmt: skip
    assert (run_dir / "config.yaml").read_bytes() == config
    # How long the run goes is not what it trains, nor the name of its (copied) run dir: allowed.
    copy = shutil.copytree(run_dir, run_dir.with_name("changed_copy"))
    main([*argv[:-2], "trainer.max_steps=6", "run_name=changed_copy", "resume=true"])
    assert max(m["step"] for m in read_metrics(copy)) == 6 and (copy / "final").is_dir()


def test_resume_drops_a_half_written_log_line_and_without_a_checkpoint_starts_clean(root):
    """Issue 22 (7, 14): resume=true with no checkpoint wrote the step-0 line twice; a log line cut short
    by a kill was a JSON traceback."""
    argv, run_dir = unfinished_run(root, "no_checkpoint", max_steps=2)  # save_every_steps=3: none
    expected = comparable_metrics(run_dir)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "train/lo')
    main([*argv, "resume=true"])
    assert comparable_metrics(run_dir) == expected  # the same run again from step 0, each line once
    assert [m["step"] for m in read_metrics(run_dir)].count(0) == 1


def test_a_failed_overwrite_leaves_the_earlier_run_whole(root, tmp_path, capsys, guarded):
    """Issue 22 (1): overwrite=true deleted the earlier run before the new one had done anything. The new
    run fails after the run dir is prepared (the SFT dir is no model): the earlier run is back, byte for
    byte (`guarded`), and nothing of the failed run is left beside it."""
    run_dir = root / "default" / "dpo" / "full"
    before = sorted(p.name for p in run_dir.iterdir())
    fails(["dpo", *TINY, f"output_root={root}", f"sft_checkpoint={tmp_path}", "run_name=full",
           "overwrite=true"], capsys, "not a model checkpoint")  # fmt: skip
    assert sorted(p.name for p in run_dir.iterdir()) == sorted({*before, ".lock"})


def test_a_second_process_in_a_run_dir_refuses(root, capsys, guarded):
    """Issue 22 (4): two identical commands started together both ran, each line written twice. A run
    holds its run dir's lock for its whole life; here the test holds it."""
    run_dir = root / "default" / "dpo" / "locked"
    run_dir.mkdir(parents=True)
    with (run_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails(["dpo", *dpo_args(root), "trainer.max_steps=1", "run_name=locked"], capsys,
              f"{run_dir} is in use by another dpo-run")  # fmt: skip
    assert not (run_dir / "metrics.jsonl").exists()
    main(["dpo", *dpo_args(root), "trainer.max_steps=1", "run_name=locked"])  # once it is free


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
         ["model.safetensors is truncated or damaged"]),
        (lambda d: (d / "model.safetensors").unlink(), ["config.json but no weights (model.safetensors)"]),
    ],
)  # fmt: skip
def test_a_damaged_sft_checkpoint_is_named_in_one_line(root, tmp_path, capsys, guarded, damage, words):
    """Issue 22 (14, 15): a truncated model.safetensors was a loader traceback; a dir without weights was
    blamed on the hub being unreachable."""
    copy = shutil.copytree(root / "default" / "sft" / "full" / "final", tmp_path / "final")
    damage(copy)
    fails(["dpo", *TINY, f"output_root={root}", f"sft_checkpoint={copy}", "run_name=damaged"], capsys,
          f"sft_checkpoint={copy}", *words)  # fmt: skip


def test_resume_of_a_finished_run_refuses(root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", *dpo_args(root), "trainer.max_steps=30", "run_name=full", "resume=true"])
    assert exit_info.value.code == 2 and "nothing to resume" in capsys.readouterr().err


# Bad input: exit code 2, one line naming the problem, nothing on disk touched.


@pytest.fixture
def guarded(root):
    """The files of the earlier runs, to check a failed command leaves them as they were."""

    def files() -> dict[Path, bytes]:
        # Hydra's own per-invocation files (.hydra/, cli.log) are rewritten by design.
        return {
            p: p.read_bytes()
            for p in (root / "default").rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.name != "cli.log"
        }

    snapshot = files()
    yield
    after = files()
    assert {p: b for p, b in after.items() if p in snapshot} == snapshot


def fails(argv: list[str], capsys, *words: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("dpo-run: error:") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def _data(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


PAIR = json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"})
BAD_RANKING = json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]})
TIED = [json.dumps({"prompt": f"p{i}", "responses": ["a", "b"], "ranking": [0, 1], "rewards": [0.5, 0.5]})
        for i in range(20)]  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ([PAIR, PAIR, '{"prompt": "p", "chosen": "x"', PAIR], ["line 3", "not valid JSON"]),
        ([PAIR, json.dumps({"prompt": "p", "chosen": 5, "rejected": "b"})], ["line 2", "'chosen'", "string"]),
        ([PAIR, json.dumps({"prompt": "p", "chosen": "a"})], ["line 2", "expected fields"]),
        (["", ""], ["holds no records"]),
        ([BAD_RANKING], ["line 1", "permutation"]),
        (TIED, ["no training examples left", "min_reward_gap"]),
    ],
)  # fmt: skip
def test_bad_data_files(root, tmp_path, capsys, guarded, lines, words):
    path = _data(tmp_path, "data.jsonl", lines)
    before = Path(path).read_bytes()
    fails(["dpo", *dpo_args(root), "data=jsonl", f"data.path={path}", "run_name=bad"], capsys, *words)
    assert Path(path).read_bytes() == before
    assert not (root / "default" / "dpo" / "bad" / "metrics.jsonl").exists()


def test_identical_pairs_are_dropped_and_counted(root, tmp_path, capsys):
    rows = [
        {"prompt": f"p{i}", "chosen": "same", "rejected": "same" if i < 3 else "other"} for i in range(40)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    main(["dpo", *dpo_args(root), "data=jsonl", f"data.path={path}", "trainer.max_steps=1",
          "run_name=identical"])  # fmt: skip
    out = capsys.readouterr().out  # reported per split (train and held-out)
    assert (
        sum(
            map(
                int,
                re.findall(
                    r"dropped (\d+) pair\(s\) whose chosen and rejected completions are identical", out
                ),
            )
        )
        == 3
    )


def test_long_prompts_are_cut_from_the_left_and_reported(root, tmp_path, capsys):
    rows = [{"prompt": "x" * 100 + f" {i}", "chosen": "good", "rejected": "bad"} for i in range(40)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    main(["dpo", *dpo_args(root), "data=jsonl", f"data.path={path}", "trainer.max_steps=1",
          "data.max_prompt_length_tokens=16", "data.max_length_tokens=32", "run_name=long"])  # fmt: skip
    assert (
        "prompt(s) longer than data.max_prompt_length_tokens=16 were cut from the left"
        in capsys.readouterr().out
    )


def test_rerun_refuses_naming_both_options(root, capsys, guarded):
    fails(["dpo", *dpo_args(root), "run_name=full"], capsys, "resume=true", "overwrite=true")


def test_checkpoint_dir_that_is_not_a_model(root, tmp_path, capsys, guarded):
    fails(["dpo", *TINY, f"output_root={root}", f"sft_checkpoint={tmp_path}", "run_name=bad"], capsys,
          "not a model checkpoint")  # fmt: skip


def test_unreachable_hub_model_while_offline(root, capsys, guarded):
    fails(["sft", "model=gpt2_large", "logger=none", f"output_root={root}", "run_name=hub"], capsys,
          "HF_HUB_OFFLINE=1", "model.name_or_path=")  # fmt: skip


def test_debug_shows_the_traceback(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["dpo", *TINY, f"output_root={root}", f"sft_checkpoint={tmp_path}", "run_name=bad", "debug=true"]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback" in err and "ConfigError" in err and "not a model checkpoint" in err


SAVE_WITHOUT_DEEPSPEED = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from dpo_cli.checkpoints import save_model
from dpo_cli.models import tiny_tokenizer

config = LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, tie_word_embeddings=True)
model = LlamaForCausalLM(config)
save_model(model, tiny_tokenizer(), Path(sys.argv[1]))
assert "deepspeed" not in sys.modules, "saving a plain model imported DeepSpeed"
loaded = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
    assert torch.equal(a, b), name
"""


def test_saving_a_plain_model_does_not_import_deepspeed_and_loads_back(tmp_path):
    # accelerate imports DeepSpeed (when installed) to test whether a model is wrapped; a plain model
    # is not, and the import costs ~0.3 s of every run's end.
    subprocess.run([sys.executable, "-c", SAVE_WITHOUT_DEEPSPEED, str(tmp_path / "m")], check=True)


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_stops_in_one_line_and_removes_the_partial_write(tmp_path, error):
    older = checkpoints.write_atomically(tmp_path / "step-3", lambda d: (d / "weights").write_text("old"))

    def write(directory: Path) -> None:
        (directory / "weights").write_text("partial")
        raise error

    with pytest.raises(RunStopped, match="no space left on the device while writing .*step-6"):
        checkpoints.write_atomically(tmp_path / "step-6", write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]  # no .tmp-step-6, no step-6
    assert (older / "weights").read_text() == "old"
    error_other = ValueError("other")

    def fail(directory: Path) -> None:
        raise error_other

    with pytest.raises(ValueError, match="other"):  # any other error passes through unchanged
        checkpoints.write_atomically(tmp_path / "step-9", fail)


def test_a_full_disk_while_caching_stops_in_one_line_and_removes_the_partial_file(tmp_path, monkeypatch):
    def save(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", save)
    with pytest.raises(RunStopped, match="no space left on the device while writing .*part-1.pt"):
        checkpoints.torch_save_atomically({"logps": [0.0]}, tmp_path / "cache" / "part-1.pt")
    assert list((tmp_path / "cache").iterdir()) == []  # no .tmp-part-1.pt, no part-1.pt
