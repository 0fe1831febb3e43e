"""Several processes, one run: launching the ranks, DeepSpeed's config, the few collectives the loop needs.

`dpo-run sft|dpo trainer=zero2 trainer.num_processes=N`, started by hand, is the launcher: it runs torchrun's
own code (torch.distributed.run) in its process, which starts N ranks on this node, each re-running the same
stage with the same overrides in the same run dir, and waits for them; a `-m` sweep does that job by job.
Started by a launcher (`torchrun --nnodes ...`, `deepspeed --hostfile ...`, Slurm running torchrun) the
environment already names the rank (`LOCAL_RANK`, `WORLD_SIZE`) and the process simply runs as that rank.
In a multi-node Slurm job of Hydra's submitit launcher (one task per node), each node's `dpo-run` starts its
node's ranks and torchrun's rendezvous on the job's first node joins them.

Every rank joins the process group (gloo on CPU, nccl on GPUs) and takes part in every collective: the
gradient reduction, the held-out evaluation and the sampling (all ranks run the same forward passes, which
ZeRO-3 needs), checkpoint saves. Only rank 0 writes metrics, samples, config.yaml, wandb and `final/`.

This module imports torch and DeepSpeed only inside its functions, so `dpo-run --help` stays fast.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dpo_cli.errors import ConfigError

# Stages that train, and so run as several ranks under DeepSpeed; the others always run in one process.
TRAINING_STAGES = ("sft", "dpo", "rm", "ppo")
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")


class RanksFailed(RuntimeError):
    """A rank of a launched run failed; torchrun stopped the others. `exit_code` is the CLI's exit code."""

    def __init__(self, message: str, exit_code: int, *, interrupted: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.interrupted = interrupted
        """Stopped by a signal (the ranks saved a checkpoint, if their step ended in time)."""


def wanted(cfg: DictConfig) -> bool:
    """Whether this stage runs on DeepSpeed (as ranks) rather than in one process."""
    return cfg.trainer.engine == "deepspeed" and cfg.stage in TRAINING_STAGES


def inside_launcher() -> bool:
    """True in a process started by torchrun, the deepspeed launcher or `dpo-run` itself (as a rank)."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 outside a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Ranks in the process group (1 outside one)."""
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """Rank 0, the one that writes the run dir's files and logs to wandb (always true in one process)."""
    return rank() == 0


def expected_world_size(cfg: DictConfig) -> int:
    """The world size a run will have: the launcher's, or `trainer.num_processes` per node when dpo-run
    launches."""
    if cfg.trainer.engine != "deepspeed":
        return 1
    nodes = _slurm_nodes()
    return int(os.environ.get("WORLD_SIZE", cfg.trainer.num_processes * (nodes[0] if nodes else 1)))


def _slurm_nodes() -> tuple[int, int, str, str] | None:
    """(nodes, this node, first host, job id) when Hydra's submitit launcher runs one dpo-run task on each
    node of a multi-node Slurm job (hydra.launcher.nodes=N, hydra.launcher.tasks_per_node=1)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    import submitit

    env = submitit.JobEnvironment()
    if env.num_nodes < 2 or env.num_tasks != env.num_nodes:
        return None
    return env.num_nodes, env.node, env.hostnames[0], env.job_id


def preemption_signal() -> int | None:
    """The signal submitit sends a job before Slurm preempts it or its time runs out (then it requeues the
    job), inside a job of Hydra's submitit launcher; None elsewhere."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import signal

    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


def first_node() -> bool:
    """False on the other nodes of a multi-node Slurm job (node 0 checks the run dir)."""
    nodes = _slurm_nodes()
    return nodes is None or nodes[1] == 0


def _rendezvous_args() -> list[str]:
    """torchrun's node arguments: this node alone, or every node of the Slurm job, meeting on the first."""
    nodes = _slurm_nodes()
    if nodes is None:
        return ["--standalone"]
    num_nodes, node, host, job_id = nodes
    return [
        f"--nnodes={num_nodes}",
        f"--node_rank={node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={host}:29500",
        f"--rdzv_id={job_id}",
    ]


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops are cached: $TORCH_EXTENSIONS_DIR when set, else
    `<user cache>/dpo-cli/torch_extensions`. The first run compiles them (about a minute on 2 CPU cores)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dpo-cli" / "torch_extensions"


def launcher_rank() -> int:
    """This process's global rank as its launcher set it (0 outside a launcher), valid before and after the
    process group."""
    return int(os.environ.get("RANK", 0)) if inside_launcher() else 0


def quiet_unless_rank_zero() -> None:
    """Ranks other than 0 print nothing to stdout and show no progress bars (their errors still go to
    stderr). Called first thing in a rank: tqdm reads TQDM_DISABLE when it is imported."""
    if launcher_rank() != 0:
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


@contextlib.contextmanager
def rank_context(cfg: DictConfig) -> Iterator[None]:
    """Join the process group for the run (a DeepSpeed training stage inside a launcher) and leave it at the
    end: without destroy_process_group, rank 0 aborts at exit and the launcher reports a failure."""
    if not inside_launcher():
        yield
        return
    if not wanted(cfg):
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ConfigError(
                f"started as one of {os.environ['WORLD_SIZE']} ranks, but `dpo-run {cfg.stage}` with "
                f"trainer.engine={cfg.trainer.engine} runs in one process; use trainer=zero2 or "
                "trainer=zero3 for sft and dpo, or run it without a launcher"
            )
        yield
        return
    init(cfg.trainer.device)
    try:
        yield
    finally:
        teardown()


def init(device_name: str) -> None:
    """Join the process group: nccl with one GPU per local rank, gloo on CPU."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    import torch

    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    # DeepSpeed probes its ops with test compiles that log each gcc call at INFO (Hydra's root level).
    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.WARNING)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    finally:
        root.setLevel(level)
    # ZeRO calls the collective under its old name; the warning says nothing actionable to the user.
    warnings.filterwarnings(
        "ignore", message="`torch.distributed.[a-z_]+` is deprecated", category=FutureWarning
    )


def teardown() -> None:
    import torch.distributed as dist

    if _initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if _initialized():
        dist.barrier()


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank (so every rank takes the same branch)."""
    import torch
    import torch.distributed as dist

    if not _initialized():
        return bool(flag)
    value = torch.tensor([0.0 if flag else 1.0])
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value.item() == 0


def any_true(flag: bool) -> bool:
    return not all_true(not flag)


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    import torch.distributed as dist

    if not _initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Example-weighted means of every rank's micro-batch metrics: the global batch's means, the same
    numbers one process gets for the same batch (in one process: the means of `parts`)."""
    import torch
    import torch.distributed as dist

    if not parts:  # every micro-batch of the step was dropped (trainer.nan_policy=skip_batch, one process)
        return {}
    keys = list(parts[0][1])
    sums = torch.tensor(
        [sum(n * m[k] for n, m in parts) for k in keys] + [sum(n for n, _ in parts)], dtype=torch.float64
    )
    if _initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)}


def synced_generation(model: Any) -> bool:
    """generate(synced_gpus=...): under ZeRO-3 each forward pass gathers the weights from every rank, so a
    rank whose samples all ended keeps stepping until every rank's have."""
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    return bool(partitioned and partitioned() and world_size() > 1)


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif (
            value != "auto"
        ):  # HF Trainer's convention: "auto" keeps the value derived from the trainer config
            merged[key] = value
    return merged


def deepspeed_config(t: DictConfig, *, world: int, cuda: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config from the `trainer` config: the same examples per optimizer step as one
    process (train_batch_size = batch_size_examples = micro-batch x accumulation x ranks), the same clipping,
    ZeRO stage and offloading (pinned memory on GPUs); trainer.precision=bf16-mixed / 16-mixed turn on its
    bf16 / fp16 sections (bf16 / fp16 compute weights, the fp32 master copy in the optimizer; fp16 with a
    dynamic loss scale). `trainer.deepspeed_config=PATH` is merged over it, key by key."""
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if t.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config: dict[str, Any] = {
        "train_batch_size": t.batch_size_examples,
        "train_micro_batch_size_per_gpu": t.microbatch_size_examples,
        "gradient_accumulation_steps": t.batch_size_examples // (t.microbatch_size_examples * world),
        "gradient_clipping": t.max_grad_norm or 0.0,  # 0: no clipping
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16-mixed"},
        # loss_scale 0: dynamic, from 2**16, as torch's GradScaler.
        "fp16": {"enabled": t.precision == "16-mixed", "loss_scale": 0, "initial_scale_power": 16},
        # Our optimizers are torch's RMSprop / AdamW (the paper's RMSprop has no DeepSpeed kernel).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # dpo-run logs its own metrics
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config:
        try:
            own = json.loads(Path(t.deepspeed_config).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"trainer.deepspeed_config={t.deepspeed_config}: {err}") from err
        config = _deep_merge(config, own)
    return config


def reference_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of a frozen ZeRO-3 model (the reference): same sharding, no optimizer."""
    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    return config


def _quoted(value: str) -> str:
    """A Hydra override value taken literally (a run dir name holds '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def launch(stage: str, overrides: list[str], run_dir: Path, num_processes: int) -> None:
    """Run `dpo-run <stage> <overrides>` as `num_processes` ranks on this node, all in `run_dir`, and wait.

    torchrun's agent runs in this process: when one rank fails or is killed it stops the others, and
    this raises RanksFailed naming the rank that failed first.
    """
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = [
        f"--nproc_per_node={num_processes}",
        *_rendezvous_args(),
        "--module",
        "dpo_cli.cli",
        stage,
        *overrides,
        f"hydra.run.dir={_quoted(str(run_dir))}",
        "hydra.output_subdir=null",  # this process wrote .hydra/ already
    ]
    print(f"dpo-run: launching {num_processes} ranks per node (torchrun) in {run_dir}", flush=True)
    try:
        run(parse_args(args))
    except ChildFailedError as err:
        failed_rank, failure = err.get_first_failure()
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        raise RanksFailed(
            f"rank {failed_rank} (pid {failure.pid}) {how}; the other ranks were stopped. The ranks' "
            f"output is above; a run with trainer.save_every_steps can continue with resume=true",
            failure.exitcode if failure.exitcode > 0 else 1,
        ) from err
    except SignalException as err:
        # torchrun passed the signal on to the ranks and waited for them: they finished the step in flight
        # and saved a checkpoint (a rank's step longer than torchrun's 30 s wait is killed instead).
        raise RanksFailed(f"interrupted ({err.sigval.name}); the ranks stopped", 1, interrupted=True) from err
