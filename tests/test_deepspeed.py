"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (gloo), launched by `dpo-run` itself, against one process.

The same effective batch gives the same per-step losses (each rank trains on its share of every global
batch; DeepSpeed averages the gradients), rank 0 alone writes the run dir and a consolidated HF `final/`,
a killed rank ends the whole run, and the JIT-compiled ops are compiled once and then reused.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_cli.cli import main
from dpo_cli.config import conf_dir
from dpo_cli.distributed import deepspeed_config, extensions_dir
from dpo_cli.logging import read_metrics

pytestmark = pytest.mark.slow
STEPS = 3
# 8 pairs per step in micro-batches of 2: one process accumulates 4 micro-batches, each of 2 ranks 2.
DPO = ["dpo", "model=tiny", "logger=none", f"trainer.max_steps={STEPS}", "trainer.batch_size_examples=8",
       "trainer.microbatch_size_examples=2", f"trainer.eval_every_steps={STEPS}", "data.max_eval_examples=16",
       "eval.num_prompts=2", "eval.samples_per_prompt=2", "eval.max_new_tokens=8"]  # fmt: skip
SHM_OP = extensions_dir() / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"


def dpo_run(argv: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`dpo-run` in a fresh process, as a user starts it (it launches the ranks itself)."""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "dpo_cli.cli", *argv], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout_s)  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An SFT checkpoint and the single-process DPO run every DeepSpeed run is compared with."""
    root = tmp_path_factory.mktemp("deepspeed")
    main(["sft", "model=tiny", "logger=none", f"output_root={root}", "trainer.max_steps=2",
          "trainer.batch_size_examples=8", "trainer.microbatch_size_examples=8", "eval.num_prompts=0",
          "lr=1e-3", "run_name=sft"])  # fmt: skip
    main([*DPO, *dpo_args(root), "run_name=single"])
    return root


def dpo_args(root: Path) -> list[str]:
    return [f"output_root={root}", f"sft_checkpoint={root / 'default/sft/sft/final'}"]


@pytest.fixture(scope="module")
def zero_runs(root) -> dict[str, dict]:
    """`dpo-run dpo trainer=zero2|zero3 trainer.num_processes=2`, with the compiled op's state before each."""
    runs = {}
    for trainer in ("zero2", "zero3"):
        op_before = SHM_OP.stat().st_mtime_ns if SHM_OP.exists() else None
        # ZeRO-3 also writes a resumable DeepSpeed checkpoint at step 2 (of 3).
        save = ["trainer.save_every_steps=2"] if trainer == "zero3" else []
        argv = [*DPO, *dpo_args(root), f"trainer={trainer}", "trainer.num_processes=2", *save]
        out = dpo_run([*argv, f"run_name={trainer}"], cwd=root)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[trainer] = {"out": out, "op_before": op_before, "run_dir": root / "default" / "dpo" / trainer}
    return runs


def train_losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


@pytest.mark.parametrize("trainer", ["zero2", "zero3"])
def test_same_per_step_loss_as_one_process(root, zero_runs, trainer):
    single, run_dir = root / "default" / "dpo" / "single", zero_runs[trainer]["run_dir"]
    assert len(train_losses(run_dir)) == STEPS
    assert train_losses(run_dir) == pytest.approx(train_losses(single), rel=1e-4)
    # Held-out loss at step 0 and at the end (every rank evaluates; ZeRO-3 shards the reference too).
    evals = [[m["eval/loss"] for m in read_metrics(d) if "eval/loss" in m] for d in (run_dir, single)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=1e-4)
    # The frontier point's sampling ran on every rank; rank 0 alone wrote it (2 points x 2 prompts x 2).
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").open()]
    assert len(samples) == 2 * 2 * 2 and samples[0]["log_ratio"] == 0.0
    metrics_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_lines) == len({json.dumps(json.loads(x)) for x in metrics_lines})  # no duplicates
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.parametrize("trainer", ["zero2", "zero3"])
def test_rank_zero_writes_a_consolidated_hf_final_that_generates(root, zero_runs, trainer):
    final = zero_runs[trainer]["run_dir"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer("The movie", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 3
    weights, single = (
        load_file(final / "model.safetensors"),
        load_file(root / "default/dpo/single/final/model.safetensors"),
    )
    assert weights.keys() == single.keys()
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32, gathered from the shards
    assert all(torch.allclose(weights[k], single[k], atol=1e-5) for k in weights)


def test_jit_compiled_ops_are_cached(zero_runs):
    """The first DeepSpeed run compiles its ops into the user cache; the second loads them."""
    assert SHM_OP.is_file()
    second = zero_runs["zero3"]
    assert second["op_before"] is not None and SHM_OP.stat().st_mtime_ns == second["op_before"]
    assert "Building extension module" not in second["out"].stdout + second["out"].stderr


def test_resume_from_a_deepspeed_checkpoint_is_bit_identical(root, zero_runs):
    """Continue a copy of the ZeRO-3 run from its step-2 checkpoint (model shards, optimizer, scheduler and
    each rank's RNG): the same metrics, samples and weights as the uninterrupted run."""
    full = zero_runs["zero3"]["run_dir"]
    assert sorted(p.name for p in (full / "checkpoints" / "step-2").glob("rng-rank*.pt")) == [
        "rng-rank0.pt",
        "rng-rank1.pt",
    ]
    resumed = full.with_name("zero3_resumed")
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("final"))
    argv = [*DPO, *dpo_args(root), "trainer=zero3", "trainer.num_processes=2", "trainer.save_every_steps=2"]
    out = dpo_run([*argv, "run_name=zero3_resumed", "resume=true"], cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resume: from" in out.stdout and "step-2 (step 2)" in out.stdout

    def timeless(run_dir: Path) -> list[dict]:
        return [
            {k: v for k, v in m.items() if k != "train/examples_per_second"} for m in read_metrics(run_dir)
        ]

    assert timeless(resumed) == timeless(full)
    assert (resumed / "samples.jsonl").read_text() == (full / "samples.jsonl").read_text()
    a, b = load_file(resumed / "final" / "model.safetensors"), load_file(full / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killing_one_rank_ends_the_run_with_a_clear_message(root):
    argv = [*DPO, *dpo_args(root), "trainer=zero2", "trainer.num_processes=2", "trainer.max_steps=100000",
            "trainer.eval_every_steps=100000", "eval.num_prompts=0", "run_name=killed"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "dpo_cli.cli", *argv], cwd=root, env=env, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    metrics = root / "default" / "dpo" / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the run never reached step 1"
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(process.pid).children(recursive=True) if "LOCAL_RANK" in p.environ()]
    [rank_1] = [p for p in ranks if p.environ()["LOCAL_RANK"] == "1"]
    rank_1.send_signal(signal.SIGKILL)
    try:
        _, err = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run hung after one of its ranks was killed")
    assert process.returncode != 0
    assert "dpo-run: error: rank 1" in err and "SIGKILL" in err
    assert not (root / "default" / "dpo" / "killed" / "final").exists()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_deepspeed_config_follows_the_trainer_config(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", ["stage=dpo", "trainer=zero3", "trainer.num_processes=2",
                                 "trainer.batch_size_examples=64", "trainer.microbatch_size_examples=4",
                                 "trainer.offload_optimizer=cpu", "trainer.offload_params=cpu"])  # fmt: skip
    GlobalHydra.instance().clear()
    config = deepspeed_config(cfg.trainer, world=2, cuda=False)
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 8 and config["gradient_clipping"] == 10.0
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"] == {"enabled": False}
    assert not config["fp16"]["enabled"]
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    # An expert's own JSON is merged over it; "auto" keeps the derived value.
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"gradient_clipping": "auto", "zero_optimization": {"overlap_comm": True}}))
    cfg.trainer.deepspeed_config = str(own)
    cfg.trainer.precision = "bf16-mixed"  # DeepSpeed's bf16 section: bf16 compute, fp32 master weights
    merged = deepspeed_config(cfg.trainer, world=2, cuda=True)
    assert merged["gradient_clipping"] == 10.0 and merged["zero_optimization"]["overlap_comm"] is True
    assert merged["zero_optimization"]["stage"] == 3 and merged["bf16"] == {"enabled": True}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["trainer=zero2", "trainer.num_processes=3"], ["trainer.batch_size_examples=8", "x 3 ranks"]),
        (["trainer.num_processes=2"], ["needs DeepSpeed"]),
        (["trainer=zero2", "trainer.offload_params=cpu"], ["needs trainer.zero_stage=3"]),
        (["trainer=zero2", "trainer.deepspeed_config=/nonexistent.json"], ["no such file"]),
    ],
)
def test_bad_deepspeed_settings_fail_in_one_line(tmp_path, capsys, overrides, words):
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "model=tiny", f"output_root={tmp_path}", "trainer.batch_size_examples=8",
              "trainer.microbatch_size_examples=2", *overrides])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert all(word in err for word in words), err


def test_slurm_launcher_composes(tmp_path):
    """`dpo-run -m dpo ... hydra/launcher=submitit_slurm`: each job of the sweep is a Slurm job of its own."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", ["stage=dpo", "trainer=zero3", "trainer.num_processes=8",
                                 "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=1",
                                 "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=1",
                                 "hydra.launcher.timeout_min=600"], return_hydra_config=True)  # fmt: skip
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 8, 1)
    assert cfg.trainer.engine == "deepspeed" and cfg.trainer.num_processes == 8


def test_a_submitit_job_launches_its_own_ranks(root):
    """The submitit launcher's local executor (the Slurm one minus sbatch): the pickled job runs `dpo-run`,
    which launches the job's 2 ranks."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    argv = ["-m", *DPO, *dpo_args(root), "trainer=zero2", "trainer.num_processes=2", "trainer.max_steps=1",
            "eval.num_prompts=0", "hydra/launcher=submitit_local", "run_name=submitit"]  # fmt: skip
    out = dpo_run(argv, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    [job_log] = (root / "default" / "dpo").glob("multirun-*/.submitit/*/*_0_log.out")
    assert "launching 2 ranks per node" in job_log.read_text()
    [run_dir] = (root / "default" / "dpo").glob("multirun-*/submitit")
    assert [m["step"] for m in read_metrics(run_dir) if "train/loss" in m] == [1]
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_lora_under_zero2_and_zero3_matches_one_process(root):
    """peft=lora on 2 ranks: the same per-step losses and merged final/ as one process (dropout off, so
    the ranks' random streams do not matter); the reference is the policy with its adapter off, sharded
    with it under ZeRO-3."""
    lora = [*DPO, *dpo_args(root), "peft=lora", "peft.dropout=0.0", "lr=1e-3"]
    main([*lora, "run_name=lora_single"])
    single = root / "default" / "dpo" / "lora_single"
    for trainer in ("zero2", "zero3"):
        out = dpo_run(
            [*lora, f"trainer={trainer}", "trainer.num_processes=2", f"run_name=lora_{trainer}"], cwd=root
        )
        assert out.returncode == 0, out.stderr[-3000:]
        run_dir = root / "default" / "dpo" / f"lora_{trainer}"
        assert train_losses(run_dir)[0] == pytest.approx(math.log(2), abs=1e-6)
        assert train_losses(run_dir) == pytest.approx(train_losses(single), rel=1e-4)
        weights = load_file(run_dir / "final" / "model.safetensors")
        expected = load_file(single / "final" / "model.safetensors")
        assert weights.keys() == expected.keys()
        assert all(torch.allclose(weights[k], expected[k], atol=1e-5) for k in weights)
        assert (run_dir / "final" / "adapter" / "adapter_model.safetensors").is_file()
