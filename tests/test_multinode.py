"""The README's DeepSpeed commands as written (2 CPU ranks where they name 8), and multi-node on one machine:
two torchrun "nodes" of one rank each meeting in a c10d rendezvous on 127.0.0.1, under ZeRO-2 and ZeRO-3,
the command read from the README itself."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_cli import cli
from dpo_cli.logging import read_metrics

README = Path(__file__).resolve().parents[1] / "README.md"


def _deepspeed_section() -> str:
    text = README.read_text()
    return text[text.index("## Multi-process and multi-node (DeepSpeed)") :].split("\n## ", 1)[0]


def _commands(block_marker: str) -> list[list[str]]:
    """The commands (continuation lines joined, comments dropped) of the code block after `block_marker`."""
    section = _deepspeed_section()
    block = section[section.index(block_marker) :].split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("  #")[0].strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_every_dpo_run_command_of_the_deepspeed_section_composes_and_validates(tmp_path, monkeypatch):
    """Each `dpo-run` line with 2 ranks where it names 8 (the defaults: micro-batch auto, so 8 pairs split
    over the ranks); launched lines validate as the ranks would (WORLD_SIZE)."""
    commands = _commands("## Multi-process and multi-node (DeepSpeed)")
    assert len(commands) >= 5
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        argv = [arg.replace("num_processes=8", "num_processes=2") for arg in argv]
        if argv[0] == "dpo-run":
            args = [a for a in argv[1:] if not a.startswith("hydra") and a != "-m"]
        else:  # torchrun / deepspeed: dpo_cli.cli's own arguments, as one of 2 x 2 ranks
            args = argv[argv.index("dpo_cli.cli") + 1 :]
            monkeypatch.setenv("WORLD_SIZE", "4")
        stage = args.pop(0)
        cli.preflight([*args, f"stage={stage}"])  # exits 2 with the one-line error on a problem
        monkeypatch.delenv("WORLD_SIZE", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory) -> Path:
    """A directory whose outputs/ holds the tiny model's SFT checkpoint, which `dpo-run dpo model=tiny`
    finds by experiment and model."""
    root = tmp_path_factory.mktemp("multinode")
    out = _run(["sft", "model=tiny", "logger=none", "trainer.max_steps=2", "eval.num_prompts=0"], root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(README.parent)}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_cli.cli", *argv], cwd=cwd, env=_env(), text=True,
                          capture_output=True, timeout=600)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["zero2", "zero3"])
def test_two_torchrun_nodes_of_one_rank_train_as_two_ranks_of_one_node(sft_root, trainer):
    """The README's one-machine multi-node command, run in two processes (the two "nodes"), against
    `dpo-run` launching 2 ranks itself: the same per-step losses."""
    [command] = _commands("Two nodes on one machine")
    assert command[0] == "torchrun" and "trainer=zero3" in command
    command = [arg.replace("trainer=zero3", f"trainer={trainer}") for arg in command]
    command = [arg.replace("127.0.0.1:29400", f"127.0.0.1:{_free_port()}") for arg in command]
    command += [f"run_name=nodes_{trainer}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
    nodes = [subprocess.Popen(torchrun, cwd=sft_root, env=_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    dpo_args = command[command.index("dpo_cli.cli") + 2 : -1]
    one_node = _run(["dpo", *dpo_args, "trainer.num_processes=2", f"run_name=one_{trainer}"], sft_root)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    runs = sft_root / "outputs" / "default" / "dpo"
    losses = {
        name: [m["train/loss"] for m in read_metrics(runs / name) if "train/loss" in m]
        for name in (f"nodes_{trainer}", f"one_{trainer}")
    }
    assert len(losses[f"nodes_{trainer}"]) == 2
    assert losses[f"nodes_{trainer}"] == pytest.approx(losses[f"one_{trainer}"], rel=1e-5)
    assert (runs / f"nodes_{trainer}" / "final" / "model.safetensors").is_file()
