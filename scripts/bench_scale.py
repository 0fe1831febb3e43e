"""What a `dpo-run dpo` costs as the data grows: time to the first step and peak resident memory.

    python scripts/bench_scale.py                  # 10k, 40k and 160k pairs (~10 min on 2 cores)
    python scripts/bench_scale.py --sizes 1000 4000

Synthetic pairs (a 120-character prompt, two 250-character completions, every prompt its own) go through
`dpo-run dpo model=tiny data=jsonl trainer.max_steps=2` twice per size: cold (empty data and reference
caches: the records are read and tokenized) and warm (the same data again). Time to the first step is from
the command's start until its first train/ metrics line (imports, data, reference log-probs of the two
steps, step-0 eval of 64 held-out pairs, one step); peak RSS is the process's own (wait4). Prints a line a
run, then `rss_ratio_160k_10k=` (peak RSS of the largest size over the smallest, cold),
`startup_ratio_160k_10k=` (cold start-up, largest over smallest) and `warm_startup_fraction=` (warm
start-up over cold, at the largest size). Run it alone: another job on the CPU changes the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the", "a", "film", "movie", "great", "bad", "plot", "actor", "scene", "music", "story", "fun")


def write_pairs(path: Path, num_pairs: int) -> None:
    rng = random.Random(0)

    def text(length: int) -> str:
        words = []
        while sum(map(len, words)) + len(words) < length:
            words.append(rng.choice(WORDS))
        return " ".join(words)[:length]

    with path.open("w") as f:
        for i in range(num_pairs):
            prompt = f"{i:07d} " + text(112)
            f.write(json.dumps({"prompt": prompt, "chosen": text(250), "rejected": text(250)}) + "\n")


def tiny_checkpoint(path: Path) -> None:
    from omegaconf import OmegaConf

    from dpo_cli.config import ModelConfig
    from dpo_cli.models import load_model

    model, tokenizer = load_model(OmegaConf.structured(ModelConfig(name="tiny")), seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def timed_run(args: list[str], metrics: Path) -> tuple[float, float]:
    """(seconds until the first train/ metrics line, peak RSS in MiB) of `python -m dpo_cli.cli ARGS`."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "dpo_cli.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first_step = None
    while first_step is None and process.poll() is None:
        if metrics.is_file() and '"train/loss"' in metrics.read_text():
            first_step = time.perf_counter() - started
        time.sleep(0.05)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_scale: {' '.join(args)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return first_step or time.perf_counter() - started, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir")
    options = parser.parse_args()
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "tiny-sft"
    if not checkpoint.exists():
        tiny_checkpoint(checkpoint)
    os.environ |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    results: dict[tuple[int, str], tuple[float, float]] = {}
    for size in options.sizes:
        data = work / f"pairs-{size}.jsonl"
        if not data.exists():
            write_pairs(data, size)
        root = work / f"runs-{size}"
        for temperature in ("cold", "warm"):
            name = f"{temperature}"
            args = [
                "dpo",
                "model=tiny",
                "logger=none",
                "data=jsonl",
                f"data.path={data}",
                "data.max_eval_examples=64",
                "eval.num_prompts=0",
                f"sft_checkpoint={checkpoint}",
                f"output_root={root}",
                "trainer.max_steps=2",
                f"run_name={name}",
            ]
            results[size, temperature] = timed_run(args, root / "default" / "dpo" / name / "metrics.jsonl")
            seconds, rss = results[size, temperature]
            print(f"pairs={size} {temperature}: first step after {seconds:.1f} s, peak RSS {rss:.0f} MiB")
    small, large = min(options.sizes), max(options.sizes)
    tag = f"{large // 1000}k_{small // 1000}k"
    print(f"rss_ratio_{tag}={results[large, 'cold'][1] / results[small, 'cold'][1]:.2f}")
    print(f"startup_ratio_{tag}={results[large, 'cold'][0] / results[small, 'cold'][0]:.2f}")
    print(f"warm_startup_fraction={results[large, 'warm'][0] / results[large, 'cold'][0]:.2f}")
    print(f"runs and data: {work}")


if __name__ == "__main__":
    main()
