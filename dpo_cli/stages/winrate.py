"""`dpo-run winrate`: how often a checkpoint's completions beat a baseline's, by a judge, per temperature.

The paper's TL;DR and dialogue evaluation (Sec. 6.2): sample the policy on held-out prompts at sampling
temperatures 0.0-1.0 and have a judge (GPT-4 there; any OpenAI-compatible endpoint or a reward function
here, dpo_cli/judge.py) compare each sample with the baseline: the reference summary or chosen response
(`baseline=dataset`), or another run's samples (`baseline=PATH`, head-to-head). `method=best_of_n` samples
`n` completions per prompt and keeps the best by `reward=` (the paper's Best-of-N baseline). The run dir gets

    samples.jsonl     the policy's completions (temperature, prompt, completion): a `baseline=` for others
    judgments.jsonl   every comparison: temperature, prompt, both texts, each order's raw answer and winner,
                      the outcome (win / loss / tie / unparseable / error)
    winrate.csv       one row per temperature: win rate, 95% Wilson interval, the count of every outcome
    winrate.png       win rate vs temperature with the intervals (scripts/plot_winrate.py: many runs)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpo_cli.checkpoints import check_weights
from dpo_cli.data import json_rows, load_splits, record_kind
from dpo_cli.data.chat import Text, jsonable, plain_text
from dpo_cli.engine import rundir
from dpo_cli.errors import ConfigError
from dpo_cli.judge import Comparison, make_judge, summarize
from dpo_cli.logging import RunLogger
from dpo_cli.models import load_model
from dpo_cli.sampling import sample_completions

COLUMNS = [
    "label",
    "method",
    "temperature",
    "win_rate",
    "ci_low",
    "ci_high",
    "judged",
    "wins",
    "losses",
    "ties",
    "unparseable",
    "errors",
    "checkpoint",
    "baseline",
    "judge",
]
# Baseline texts by (prompt, temperature); temperature None: the prompt's text at any temperature.
Baselines = dict[tuple[Text, float | None], str]


# ---------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------


def reference_text(record: dict) -> str:
    """A held-out record's reference: its demonstration, its chosen response, or the best of its ranking."""
    kind = record_kind(record)
    if kind == "sft":
        return plain_text(record["completion"])
    if kind == "pair":
        return plain_text(record["chosen"])
    return plain_text(record["responses"][record["ranking"][0]])


def dataset_baselines(records: list[dict], num_prompts: int) -> tuple[list[Text], Baselines]:
    """The first `num_prompts` distinct held-out prompts and the reference of each (its first record's)."""
    baselines: Baselines = {}
    for record in records:
        baselines.setdefault((record["prompt"], None), reference_text(record))
    prompts = [prompt for prompt, _ in baselines][:num_prompts]
    return prompts, baselines


def samples_file_baselines(path: Path, num_prompts: int) -> tuple[list[str], Baselines]:
    """The first `num_prompts` distinct prompts of a samples file (JSONL of prompt + completion, optionally
    temperature) and their completions: at the same temperature when the file has it, else the first."""
    baselines: Baselines = {}
    name = f"baseline={path} (use baseline=dataset or a samples.jsonl file)"
    for where, row in json_rows(path, name):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)):
            raise ConfigError(f"baseline={where}: field 'prompt' must be a string")
        if not isinstance(row.get("completion"), str):
            raise ConfigError(f"baseline={where}: field 'completion' must be a string")
        temperature = row.get("temperature")
        if temperature is not None and not (
            isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature >= 0
        ):
            raise ConfigError(
                f"baseline={where}: field 'temperature' must be a number >= 0, got {temperature!r}"
            )
        baselines.setdefault((row["prompt"], None), row["completion"])
        if temperature is not None:
            baselines.setdefault((row["prompt"], float(temperature)), row["completion"])
    if not baselines:
        raise ConfigError(f"baseline={path} holds no samples")
    prompts = [prompt for prompt, temperature in baselines if temperature is None][:num_prompts]
    return prompts, baselines


def baseline_text(baselines: Baselines, prompt: Text, temperature: float) -> str:
    return baselines.get((prompt, float(temperature)), baselines[prompt, None])


def load_baselines(cfg: DictConfig) -> tuple[list[Text], Baselines, str]:
    """(prompts, baselines, the baseline's name for winrate.csv)."""
    if cfg.baseline == "dataset":
        _, held_out = load_splits(cfg.data)
        prompts, baselines = dataset_baselines(held_out, cfg.winrate.num_prompts)
        if not prompts:
            raise ConfigError(f"data={cfg.data.name}: no held-out prompts to compare on")
        return prompts, baselines, f"dataset:{cfg.data.name}"
    prompts, baselines = samples_file_baselines(Path(cfg.baseline), cfg.winrate.num_prompts)
    return prompts, baselines, str(cfg.baseline)


# ---------------------------------------------------------------------------------------------------------
# The policy's completions
# ---------------------------------------------------------------------------------------------------------


def policy_completions(cfg: DictConfig, model, tokenizer, prompts: list[Text], temperature: float, reward_fn):
    """One completion per prompt: a sample (`method=policy`), or the best of `n` by reward (`best_of_n`)."""
    w = cfg.winrate
    n = cfg.n if cfg.method == "best_of_n" else 1
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        num_samples=n,
        max_new_tokens=w.max_new_tokens,
        temperature=temperature,
        batch_size_prompts=w.batch_size_prompts,
        seed=w.seed,
        desc=f"sampling T={temperature:g}",
    )
    if n == 1:
        return [texts[0] for texts in samples]
    rewards = reward_fn([p for p in prompts for _ in range(n)], [t for texts in samples for t in texts])
    return [
        max(zip(rewards[i * n : (i + 1) * n], texts, strict=True), key=lambda pair: pair[0])[1]
        for i, texts in enumerate(samples)
    ]


def checkpoint_label(checkpoint: Path, method: str, n: int) -> str:
    """The legend label: the training run's method and hyperparameter ("dpo beta=0.1") when the checkpoint
    is a run's final/, else its path; Best-of-N says so."""
    from dpo_cli.frontier import run_label

    config = checkpoint.parent / "config.yaml"
    label = run_label(OmegaConf.load(config)) if config.is_file() else str(checkpoint)
    return f"best-of-{n} {label}" if method == "best_of_n" else label


# ---------------------------------------------------------------------------------------------------------
# winrate.csv / winrate.png
# ---------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_winrate_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: _cell(row[k]) for k in COLUMNS} for row in rows)
    return path


def read_winrate_csv(path: Path) -> list[dict[str, Any]]:
    numbers = {"temperature", "win_rate", "ci_low", "ci_high"}
    with path.open() as f:
        return [
            {k: (float(v) if v else math.nan) if k in numbers else v for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def write_winrate_png(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Win rate vs temperature, one line per label (checkpoint and method), 95% Wilson intervals as error
    bars, the 50% line dashed."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = list(dict.fromkeys(row["label"] for row in rows))
    for label in labels:
        points = sorted((r for r in rows if r["label"] == label), key=lambda r: r["temperature"])
        rates = [r["win_rate"] for r in points]
        ax.errorbar(
            [r["temperature"] for r in points],
            rates,
            yerr=[
                [rate - r["ci_low"] for rate, r in zip(rates, points, strict=True)],
                [r["ci_high"] - rate for rate, r in zip(rates, points, strict=True)],
            ],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate vs baseline (ties count 1/2; 95% Wilson CI)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def gather_winrates(dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """Rows of every winrate.csv below `dirs` (run dirs or any parents)."""
    files = sorted({f.resolve() for d in dirs for f in Path(d).rglob("winrate.csv")})
    return [row for f in files for row in read_winrate_csv(f)]


def main(argv: Sequence[str] | None = None) -> int:
    """`scripts/plot_winrate.py DIR [DIR ...] [--out OUT_DIR] [--title T]`: every checkpoint on one figure."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="plot_winrate.py", description="Win rate vs temperature of every winrate run below DIRs."
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    parser.add_argument("--out", type=Path, default=Path("."), help="output dir (default: current dir)")
    parser.add_argument("--title", default="Win rate vs sampling temperature", help="figure title")
    args = parser.parse_args(argv)
    rows = gather_winrates(args.dirs)
    if not rows:
        print(f"plot_winrate: no winrate.csv under {' '.join(map(str, args.dirs))}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = write_winrate_csv(rows, args.out / "winrate.csv")
    png_path = write_winrate_png(rows, args.out / "winrate.png", args.title)
    print(f"plot_winrate: wrote {csv_path} and {png_path} ({len(rows)} rows)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


def _describe(row: dict[str, Any]) -> str:
    rate = "n/a" if math.isnan(row["win_rate"]) else f"{row['win_rate']:.1%}"
    ci = "" if math.isnan(row["ci_low"]) else f" [{row['ci_low']:.1%}, {row['ci_high']:.1%}]"
    return (
        f"T={row['temperature']:g}: win rate {rate}{ci} over {row['judged']} judged "
        f"({row['wins']} wins, {row['losses']} losses, {row['ties']} ties; "
        f"{row['unparseable']} unparseable, {row['errors']} failed)"
    )


def run(cfg: DictConfig, run_dir: Path) -> None:
    checkpoint = (
        check_weights(Path(cfg.checkpoint), "checkpoint")
        if cfg.checkpoint
        else rundir.find_sft_checkpoint(cfg)
    )
    # Data and judge problems show before any model is loaded.
    prompts, baselines, baseline_name = load_baselines(cfg)
    device = rundir.prepare(cfg, run_dir).device
    reward_fn = None
    if cfg.method == "best_of_n" or cfg.judge.name == "reward":
        from dpo_cli.rewards import make_reward_fn

        reward_fn = make_reward_fn(cfg.reward, device)
    cache_path = Path(cfg.judge.cache_path or Path(cfg.output_root) / "judge_cache.jsonl")
    judge = make_judge(cfg.judge, data_name=cfg.data.name, cache_path=cache_path, reward_fn=reward_fn)
    judge_name = f"reward:{cfg.reward.name}" if cfg.judge.name == "reward" else cfg.judge.model

    print(f"winrate: {checkpoint} vs {baseline_name} on {len(prompts)} prompts, judge {judge_name}")
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, checkpoint=checkpoint)
    model.to(device).eval()
    label = checkpoint_label(checkpoint, cfg.method, cfg.n)
    method = f"best_of_{cfg.n}" if cfg.method == "best_of_n" else "policy"

    logger = RunLogger(cfg, run_dir)
    rows, judgment_rows = [], []
    with (run_dir / "samples.jsonl").open("w") as samples_file:
        for step, temperature in enumerate(cfg.temperatures):
            completions = policy_completions(cfg, model, tokenizer, prompts, temperature, reward_fn)
            samples_file.writelines(
                json.dumps(
                    {"temperature": temperature, "method": method, "prompt": jsonable(p), "completion": c}
                )
                + "\n"
                for p, c in zip(prompts, completions, strict=True)
            )
            comparisons = [
                Comparison(plain_text(p), c, baseline_text(baselines, p, temperature))
                for p, c in zip(prompts, completions, strict=True)
            ]
            judgments = [{"temperature": temperature, **j} for j in judge(comparisons)]
            judgment_rows += judgments
            row = {
                "label": label,
                "method": method,
                "temperature": temperature,
                **summarize([j["outcome"] for j in judgments]),
                "checkpoint": str(checkpoint),
                "baseline": baseline_name,
                "judge": judge_name,
            }
            rows.append(row)
            logger.log({f"winrate/{k}": row[k] for k in COLUMNS[2:12]}, step=step)
            print(_describe(row))
    with (run_dir / "judgments.jsonl").open("w") as f:
        f.writelines(json.dumps(j) + "\n" for j in judgment_rows)
    csv_path = write_winrate_csv(rows, run_dir / "winrate.csv")
    png_path = write_winrate_png(
        rows, run_dir / "winrate.png", f"{label} vs {baseline_name} (judge: {judge_name})"
    )
    stats = judge.stats
    print(
        f"judge: {stats['requests']} requests sent ({stats['retries']} retries), "
        f"{stats['cache_hits']} answers from the cache"
    )
    if any(row["errors"] for row in rows):
        print(
            "judge: some comparisons got no answer after the retries (see `errors` in judgments.jsonl); "
            "rerun with overwrite=true: cached answers are not asked again"
        )
    _log_to_wandb(logger, rows, judgment_rows, png_path)
    logger.close()
    print(f"winrate: wrote {csv_path} and {png_path}")
    rundir.finish(
        run_dir,
        "python scripts/plot_winrate.py outputs/",
        "every checkpoint's win rates on one figure",
        carry_overrides=False,
    )


def _log_to_wandb(logger: RunLogger, rows: list[dict], judgment_rows: list[dict], png_path: Path) -> None:
    """The win-rate table, every judgment and the figure, in the run's wandb run."""
    if logger.wandb_run is None:
        return
    import wandb

    judgment_columns = ["temperature", "prompt", "policy", "baseline", "answers", "outcome"]
    logger.wandb_run.log(
        {
            "winrate/table": wandb.Table(
                columns=COLUMNS, data=[[_cell(r[k]) for k in COLUMNS] for r in rows]
            ),
            "winrate/judgments": wandb.Table(
                columns=judgment_columns,
                data=[
                    [json.dumps(j[k]) if k == "answers" else j[k] for k in judgment_columns]
                    for j in judgment_rows
                ],
            ),
            "winrate/plot": wandb.Image(str(png_path)),
        }
    )
