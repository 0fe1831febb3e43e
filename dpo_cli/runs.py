"""`dpo-run runs [DIR ...]`: one line per run dir below DIR (default `outputs/`): its stage, the overrides
that set it apart from the other runs of its stage, its final metrics, and whether it finished."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from dpo_cli.frontier import differing_keys, flat_config
from dpo_cli.logging import read_metrics

# (metrics key, column): the last logged value of each, the final eval of a training run.
SHOWN = (
    ("eval/reward", "reward"),
    ("eval/kl", "KL"),
    ("eval/rewards/accuracies", "accuracy"),
    ("eval/loss", "eval loss"),
    ("winrate/win_rate", "win rate"),
)


def status(run_dir: Path, stage: str) -> str:
    if (run_dir / "final").is_dir():
        return "finished"
    outputs = {"eval": "metrics.jsonl", "winrate": "winrate.csv", "prefs": "records.jsonl"}
    if stage in outputs:
        return "finished" if (run_dir / outputs[stage]).is_file() else "not finished"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    return f"stopped (resumable: {checkpoints[-1].name})" if checkpoints else "not finished"


def gather_runs(dirs: Sequence[Path]) -> list[dict]:
    """A row per run dir (a dir with config.yaml) below `dirs`."""
    run_dirs = sorted(
        {
            c.parent.resolve()
            for d in dirs
            for c in Path(d).rglob("config.yaml")
            if not any(part == ".hydra" or part.startswith(".previous-") for part in c.parts)
        }
    )
    configs = {d: flat_config(OmegaConf.load(d / "config.yaml")) for d in run_dirs}
    rows = []
    for d in run_dirs:
        stage = str(configs[d].get("stage"))
        same_stage = [c for c in configs.values() if str(c.get("stage")) == stage]
        keys = differing_keys(same_stage)
        last = {}
        if (d / "metrics.jsonl").is_file():
            for line in read_metrics(d):
                last |= {k: v for k, v in line.items() if v is not None}
        rows.append(
            {
                "run": d,
                "stage": stage,
                "apart": " ".join(f"{k}={configs[d].get(k)}" for k in keys) or "-",
                "step": last.get("step", "-"),
                **{column: last.get(key) for key, column in SHOWN},
                "status": status(d, stage),
            }
        )
    return rows


def format_table(rows: list[dict], root: Path) -> str:
    columns = ["stage", "run", "apart", "step", *(column for _, column in SHOWN), "status"]
    shown = [c for c in columns if any(row.get(c) is not None for row in rows)]
    cells = [
        [_cell(row[c], root) if c != "run" else _relative(row["run"], root) for c in shown] for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value, root: Path) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-run runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, default=[Path("outputs")], metavar="DIR")
    args = parser.parse_args(argv)
    rows = gather_runs(args.dirs)
    if not rows:
        print(f"runs: no run dirs (config.yaml) under {' '.join(map(str, args.dirs))}")
        return 1
    print(format_table(rows, Path.cwd()))
    return 0
