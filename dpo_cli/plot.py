"""`dpo-run plot DIR ... [--out OUT_DIR] [--title T]`: the reward/KL frontier of every run below the DIRs
(frontier.csv/png, dpo_cli/frontier.py) and the win rates of every winrate run below them (winrate.csv/png,
dpo_cli/stages/winrate.py), on one figure each."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from dpo_cli.frontier import gather_points, summary, write_frontier
from dpo_cli.stages.winrate import gather_winrates, write_winrate_csv, write_winrate_png


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpo-run plot",
        description="Reward vs KL frontier and win rates of every run below DIRs (run dirs, sweep dirs or "
        "parents).",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    parser.add_argument("--out", type=Path, default=Path("."), help="output dir (default: current dir)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    rows, winrates = gather_points(args.dirs), gather_winrates(args.dirs)
    if not rows and not winrates:
        print(f"plot: no eval points (eval/kl) or winrate.csv under {' '.join(map(str, args.dirs))}")
        return 1
    if rows:
        csv_path, png_path = write_frontier(rows, args.out, args.title or "Reward vs KL frontier")
        print(summary(rows, csv_path, png_path))
    if winrates:
        args.out.mkdir(parents=True, exist_ok=True)
        csv_path = write_winrate_csv(winrates, args.out / "winrate.csv")
        title = args.title or "Win rate vs sampling temperature"
        png_path = write_winrate_png(winrates, args.out / "winrate.png", title)
        print(f"plot: wrote {csv_path} and {png_path} ({len(winrates)} win rates)")
    return 0
