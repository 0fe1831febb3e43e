"""SIGTERM and preemption (issue 25): the step in flight finishes, a resumable checkpoint is saved, the exit
says so, and `resume=true` ends bit-identical to a run that was never stopped; under Hydra's submitit
launcher the job requeues itself on submitit's preemption signal and its rerun resumes. One process
in-process, then 2 DeepSpeed ranks and a submitit job as `dpo-run` subprocesses (slow)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dpo_cli.checkpoints import latest_resumable
from dpo_cli.cli import main
from dpo_cli.errors import RunStopped
from dpo_cli.logging import read_metrics
from dpo_cli.objective import make_objective
from tests.test_loop import _cfg, _train


def test_sigterm_finishes_the_step_saves_and_resume_ends_bit_identical(tmp_path):
    straight, _, _ = _train(_cfg(tmp_path), tmp_path / "straight")
    cfg = _cfg(tmp_path)  # no save_every_steps: the checkpoint is SIGTERM's
    calls = itertools.count()

    def sigterm_in_step_2(model, batch):
        # Eval at step 0 (2 batches), step 1 (2), then the first micro-batch of step 2.
        if next(calls) == 2 + 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return make_objective(cfg.loss, cfg.beta)(model, batch)

    with pytest.raises(RunStopped) as stopped:
        _train(cfg, tmp_path / "stopped", objective=sigterm_in_step_2)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "step-2"
    assert str(stopped.value) == (
        f"interrupted (SIGTERM): saved {checkpoint} (step 2); continue with resume=true"
    )
    steps = [m["step"] for m in read_metrics(tmp_path / "stopped") if "train/loss" in m]
    assert steps == [1, 2]  # step 2 finished (both micro-batches) before the stop
    resumed, metrics, used = _train(_cfg(tmp_path, "resume=true"), tmp_path / "stopped")
    assert used == 2 * 2  # steps 3 and 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --- subprocesses: 2 DeepSpeed ranks, a submitit job --------------------------------------------------

STEPS = 12
DPO = ["dpo", "model=tiny", "logger=none", f"trainer.max_steps={STEPS}", "trainer.batch_size_examples=8",
       f"trainer.eval_every_steps={STEPS}", "data.max_eval_examples=8", "eval.num_prompts=0",
       "lr=1e-3"]  # fmt: skip


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "dpo_cli.cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    process = _start(argv, cwd)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def _when_a_step_is_logged(metrics: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and '"train/loss"' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no training step logged in {metrics} (exit {process.poll()})")


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("preemption")
    main(["sft", "model=tiny", "logger=none", f"output_root={root}", "trainer.max_steps=2",
          "trainer.batch_size_examples=8", "eval.num_prompts=0", "lr=1e-3", "run_name=sft"])  # fmt: skip
    return root, [f"output_root={root}", f"sft_checkpoint={root / 'default/sft/sft/final'}"]


@pytest.mark.slow
def test_sigterm_on_two_ranks_saves_and_resumes_bit_identical(sft):
    root, args = sft
    ranks = [*DPO, *args, "trainer=zero2", "trainer.num_processes=2"]
    straight = _run([*ranks, "run_name=straight"], root)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = root / "default" / "dpo" / "stopped"
    process = _start([*ranks, "run_name=stopped"], root)
    _when_a_step_is_logged(run_dir / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)  # to dpo-run, the launcher: torchrun passes it on to the ranks
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err[-3000:]
    checkpoint = latest_resumable(run_dir)
    assert checkpoint is not None, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert f"interrupted (SIGTERM); the ranks stopped; continue from {checkpoint} with resume=true" in err
    assert "dpo-run: stopped: interrupted (SIGTERM): saved" in err  # rank 0's own line
    assert not (run_dir / "final").exists()

    resumed = _run([*ranks, "run_name=stopped", "resume=true"], root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert steps == list(range(1, STEPS + 1))
    final = load_file(run_dir / "final" / "model.safetensors")
    expected = load_file(root / "default" / "dpo" / "straight" / "final" / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


@pytest.mark.slow
def test_a_preempted_submitit_job_requeues_and_resumes(sft):
    """submitit's local executor (the Slurm one minus sbatch; a requeue restarts the task): its preemption
    signal (SIGUSR2) to the job saves a checkpoint, submitit requeues the job, the rerun resumes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root, args = sft
    main([*DPO, *args, "run_name=direct"])
    process = _start(["-m", *DPO, *args, "hydra/launcher=submitit_local", "run_name=job"], root)
    deadline = time.monotonic() + 300
    while not list((root / "default" / "dpo").glob("multirun-*/job/metrics.jsonl")):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    [run_dir] = [p.parent for p in (root / "default" / "dpo").glob("multirun-*/job/metrics.jsonl")]
    _when_a_step_is_logged(run_dir / "metrics.jsonl", process)
    # The job's task: the python process below the submitit controller that dpo-run started.
    [task] = [p for p in psutil.Process(process.pid).children(recursive=True) if p.children() == []]
    task.send_signal(signal.SIGUSR2)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    [job_log] = run_dir.parent.glob(".submitit/*/*_0_log.out")
    [job_err] = run_dir.parent.glob(".submitit/*/*_0_log.err")
    assert "a requeued job: resuming" in job_log.read_text()
    assert "requeueing the job" in job_err.read_text()
    steps = [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert steps == list(range(1, STEPS + 1))
    final = load_file(run_dir / "final" / "model.safetensors")
    expected = load_file(root / "default" / "dpo" / "direct" / "final" / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in final)
