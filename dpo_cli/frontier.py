"""The reward-vs-KL frontier (paper Fig. 2 left): every eval point of every run, as a CSV and a figure.

A "frontier point" is one `metrics.jsonl` line with `eval/kl` (sequence-level KL(pi || pi_ref), nats) and
`eval/reward` (mean true reward). `gather_points` collects them from run dirs or any parents of run dirs,
`write_frontier` writes `frontier.csv` and `frontier.png`, `FrontierCallback` does both at the end of a
Hydra multirun (and logs them to wandb); `dpo-run plot` (dpo_cli/plot.py) does both for any dirs.

A run's label is its method and hyperparameter (`run_label`), plus the keys whose values tell it apart
from the other runs of that label (`lr=1e-05`, `seed=1`): two runs never share a label by accident.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dpo_cli.logging import wandb_group, wandb_mode

COLUMNS = [
    "run_dir",
    "label",
    "method",
    "step",
    "kl",
    "kl_se",
    "reward",
    "reward_se",
    "is_final",
    "reward_delta",
    "reward_delta_se",
    "ref_logp_per_token",
    "distinct_2",
]
KL_AXIS = "KL(π ‖ π_ref) [nats, sequence-level]"
REWARD_AXIS = "reward (mean, ± s.e.)"

# Legend order and look per method. A method's runs share a colour map and a marker; its hyperparameter
# values get shades of that map, so "which method" reads from the hue and "which beta" from the shade.
METHOD_STYLE: dict[str, tuple[str, str]] = {
    "sft": ("Greys", "*"),
    "dpo": ("Blues", "o"),
    "ipo": ("Purples", "s"),
    "cdpo": ("Reds", "D"),
    "plackett_luce": ("PuRd", "^"),
    "unlikelihood": ("Oranges", "v"),
    "preferred_ft": ("Greens", "P"),
    "ppo": ("RdPu", "p"),
    "ppo_rm": ("YlOrRd", "8"),
    "rloo": ("BuGn", "d"),
    "eval": ("YlOrBr", "X"),
    "best-of-N": ("Greys", "h"),
}
_OTHER_STYLE = ("viridis", "o")


def run_label(cfg: DictConfig) -> str:
    """Method plus the hyperparameter that tells its runs apart: "dpo beta=0.1", "unlikelihood alpha=0.5"."""
    stage = OmegaConf.select(cfg, "stage", default=None)
    if stage == "eval":
        return f"eval {OmegaConf.select(cfg, 'run_name', default='?')}"
    if stage == "ppo":  # PPO-GT (the true reward), PPO on a learned reward model (ppo_rm), or RLOO
        algorithm = OmegaConf.select(cfg, "ppo.algorithm", default="ppo")
        learned = OmegaConf.select(cfg, "ppo.reward_model_path", default=None)
        return f"{algorithm}{'_rm' if learned else ''} beta={OmegaConf.select(cfg, 'beta'):g}"
    method = OmegaConf.select(cfg, "loss.name", default=None) or str(stage)
    if stage == "sft" or method == "sft":
        return "sft"
    beta = OmegaConf.select(cfg, "beta", default=None)
    if method == "cdpo":
        return f"cdpo beta={beta:g} eps={OmegaConf.select(cfg, 'loss.label_smoothing', default=0.0):g}"
    if method == "unlikelihood":
        return f"unlikelihood alpha={OmegaConf.select(cfg, 'loss.alpha', default=0.0):g}"
    if method == "preferred_ft":  # no hyperparameter: the paper sweeps seeds
        return f"preferred_ft seed={OmegaConf.select(cfg, 'seed', default=0)}"
    return f"{method} beta={beta:g}" if beta is not None else method


# Keys that say where or how a run ran, not what it trained: never part of a label.
_NOT_LABELS = ("run_name", "output_root", "exp_name", "resume", "overwrite", "debug", "logger",
               "trainer.device", "trainer.num_threads", "trainer.num_processes", "ref", "provenance",
               "stage")  # fmt: skip


def flat_config(config: DictConfig | dict) -> dict[str, Any]:
    """`{"trainer.max_steps": 80, ...}` of a run's config.yaml."""
    tree = OmegaConf.to_container(config) if isinstance(config, DictConfig) else config
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(tree, "")
    return flat


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The keys (of `flat_config`s) whose values are not the same in all `configs`, in key order."""
    keys = sorted({k for c in configs for k in c})
    return [
        k
        for k in keys
        if not any(k == n or k.startswith(n + ".") for n in _NOT_LABELS)
        and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1
    ]


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def distinct_labels(configs: dict[Path, DictConfig]) -> dict[Path, str]:
    """run dir -> label: `run_label`, plus the keys that differ between the runs sharing that label (their
    values); runs alike in every key get their dir's name."""
    base = {d: run_label(c) for d, c in configs.items()}
    labels = {}
    for label in set(base.values()):
        dirs = [d for d in configs if base[d] == label]
        flats = {d: flat_config(configs[d]) for d in dirs}
        keys = [k for k in differing_keys(list(flats.values())) if f"{k.removeprefix('loss.')}=" not in label]
        for d in dirs:
            extra = " ".join(f"{k.removeprefix('loss.')}={_value(flats[d].get(k))}" for k in keys)
            labels[d] = f"{label} {extra}".strip()
        if len(dirs) > 1 and len({labels[d] for d in dirs}) < len(dirs):
            labels |= {d: f"{labels[d]} ({d.name})" for d in dirs}
    return labels


def _sampler_label(config: DictConfig) -> str:
    """Which model an `eval` run's Best-of-N points were drawn from: the SFT model, or the checkpoint (its
    run's label when it is a run's final/)."""
    checkpoint = OmegaConf.select(config, "checkpoint", default=None)
    if not checkpoint:
        return "sft"
    run_config = Path(checkpoint).parent / "config.yaml"
    return run_label(OmegaConf.load(run_config)) if run_config.is_file() else Path(checkpoint).parent.name


def _method(label: str) -> str:
    return "best-of-N" if label.startswith("best-of-N") else label.split(" ")[0]


def _points_of_line(line: dict[str, Any], label: str, sampler: str | None = None) -> list[dict[str, Any]]:
    """The frontier points one metrics line carries: a policy eval point and/or a Best-of-N point. A
    Best-of-N point sits at its KL to the reference; an older line drawn from another model than the
    reference (`sampler` not "sft") has only its KL to that model: its KL is left empty (own panel)."""
    points = []
    if line.get("eval/kl") is not None and line.get("eval/reward") is not None:
        points.append(
            {
                "label": label,
                "kl": line["eval/kl"],
                "kl_se": line.get("eval/kl_se"),
                "reward": line["eval/reward"],
                "reward_se": line.get("eval/reward_se"),
                "reward_delta": line.get("eval/reward_delta"),
                "reward_delta_se": line.get("eval/reward_delta_se"),
                "ref_logp_per_token": line.get("eval/ref_logp_per_token"),
                "distinct_2": line.get("eval/distinct_2"),
            }
        )
    if line.get("eval/bon_kl") is not None and line.get("eval/bon_reward") is not None:
        kl_known = "eval/bon_kl_to_sampler" in line or sampler in (None, "sft")
        points.append(
            {
                "label": f"best-of-N N={line.get('eval/bon_n')}" + (f" of {sampler}" if sampler else ""),
                "kl": line["eval/bon_kl"] if kl_known else None,
                "kl_se": None,
                "reward": line["eval/bon_reward"],
                "reward_se": line.get("eval/bon_reward_se"),
                "reward_delta": None,
                "reward_delta_se": None,
                "ref_logp_per_token": None,
                "distinct_2": None,
            }
        )
    return points


def gather_points(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """One row per eval point of every run found below `run_dirs` (run dirs, sweep dirs or any parents).

    A run is a `metrics.jsonl` with a sibling `config.yaml`; SFT runs are left out (another reference).
    Rows of a run are in step order; `is_final` marks the last point of each label of the run (its final
    eval; every Best-of-N N is its own label).
    """
    files = sorted({f.resolve() for d in run_dirs for f in Path(d).rglob("metrics.jsonl")})
    # Not a run dir without config.yaml (no way to label it); SFT runs: their KL is to the pre-SFT model,
    # not to the SFT reference of the rest.
    configs = {
        f.parent: OmegaConf.load(f.parent / "config.yaml")
        for f in files
        if (f.parent / "config.yaml").is_file()
    }
    configs = {d: c for d, c in configs.items() if c.get("stage") != "sft"}
    labels = distinct_labels(configs)
    rows: list[dict[str, Any]] = []
    for run_dir, config in configs.items():
        sampler = _sampler_label(config) if config.get("stage") == "eval" else None
        with (run_dir / "metrics.jsonl").open() as f:
            lines = [json.loads(line) for line in f if line.strip()]
        run_rows = [
            {"run_dir": str(run_dir), "method": _method(p["label"]), "step": line["step"], **p}
            for line in lines
            for p in _points_of_line(line, labels[run_dir], sampler)
        ]
        run_rows.sort(key=lambda r: r["step"])  # stable: equal steps keep file order
        last_index = {r["label"]: i for i, r in enumerate(run_rows)}
        for i, row in enumerate(run_rows):
            row["is_final"] = last_index[row["label"]] == i
        rows += [{key: row[key] for key in COLUMNS} for row in run_rows]
    return rows


def _legend_key(label: str) -> tuple:
    """Methods in METHOD_STYLE order, then hyperparameter values numerically (beta=5 after beta=0.5)."""
    method = _method(label)
    rank = list(METHOD_STYLE).index(method) if method in METHOD_STYLE else len(METHOD_STYLE)
    numbers = tuple(float(v) for v in re.findall(r"=(-?[\d.]+(?:e-?\d+)?)", label))
    return (rank, method, numbers, label)


def _label_styles(labels: Iterable[str]) -> dict[str, tuple[Any, str]]:
    """label -> (colour, marker): one colour map per method, evenly spaced shades over its labels."""
    import matplotlib

    by_method: dict[str, list[str]] = {}
    for label in sorted(set(labels), key=_legend_key):
        by_method.setdefault(_method(label), []).append(label)
    styles = {}
    for method, method_labels in by_method.items():
        cmap_name, marker = METHOD_STYLE.get(method, _OTHER_STYLE)
        cmap = matplotlib.colormaps[cmap_name]
        n = len(method_labels)
        # Light ends of a sequential map are unreadable on white; stay in 0.45..0.95.
        shades = [0.75] if n == 1 else [0.45 + 0.5 * i / (n - 1) for i in range(n)]
        styles.update({label: (cmap(s), marker) for label, s in zip(method_labels, shades, strict=True)})
    return styles


def write_frontier(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write `frontier.csv` (one row per point, columns COLUMNS) and `frontier.png` into `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside a Hydra job on a headless machine
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "frontier.csv", out_dir / "frontier.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)

    styles = _label_styles(row["label"] for row in rows)
    unknown_kl = [row for row in rows if row["kl"] is None]
    if unknown_kl:  # Best-of-N of another model than the reference, from an older eval: its own panel
        fig, (ax, side) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 1]})
        for row in unknown_kl:
            colour, marker = styles[row["label"]]
            n = int(re.search(r"N=(\d+)", row["label"]).group(1))
            side.errorbar([n], [row["reward"]], yerr=[row["reward_se"] or 0.0], color=colour, marker=marker)
        side.set_xscale("log", base=2)
        side.set_xlabel("N (KL to the reference unknown)")
        side.set_title("Best-of-N of another model", fontsize=10)
        side.grid(True, alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(10, 6))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in (r for r in rows if r["kl"] is not None):  # one line per (run, label), in step order
        series.setdefault((row["run_dir"], row["label"]), []).append(row)
    for (_, label), points in series.items():
        points = sorted(points, key=lambda r: r["step"])
        colour, marker = styles[label]
        ax.errorbar(
            [p["kl"] for p in points],
            [p["reward"] for p in points],
            xerr=[p["kl_se"] or 0.0 for p in points],
            yerr=[p["reward_se"] or 0.0 for p in points],
            color=colour,
            marker=marker,
            markersize=5,
            linewidth=1.0,
            elinewidth=0.8,
            capsize=2,
            alpha=0.85,
        )
        final = [p for p in points if p["is_final"]]
        ax.scatter(
            [p["kl"] for p in final],
            [p["reward"] for p in final],
            s=110,
            color=colour,
            marker=marker,
            edgecolors="black",
            linewidths=1.3,
            zorder=3,
        )
    handles = [
        Line2D([], [], color=styles[label][0], marker=styles[label][1], linewidth=1.0, label=label)
        for label in sorted(styles, key=_legend_key)
    ]
    handles.append(
        Line2D([], [], color="white", marker="o", markersize=9, markeredgecolor="black", linewidth=0,
               label="final eval of a run")
    )  # fmt: skip
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.set_xlabel(KL_AXIS)
    ax.set_ylabel(REWARD_AXIS)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=150)
    plt.close(fig)
    return csv_path, png_path


def summary(rows: Sequence[dict[str, Any]], csv_path: Path, png_path: Path) -> str:
    n_runs = len({row["run_dir"] for row in rows})
    return f"frontier: wrote {csv_path} and {png_path} ({len(rows)} points from {n_runs} runs)"


class FrontierCallback(Callback):
    """At the end of a Hydra multirun: frontier.csv/png of all its jobs in the sweep dir, and to wandb.

    Enable with `hydra.callbacks.frontier._target_=dpo_cli.frontier.FrontierCallback`.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra passes the same config object the launcher used, so `${now:...}` resolves from its
        # cache to the timestamp the jobs were written under.
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = gather_points([sweep_dir])
        if not rows:
            print(f"frontier: no eval points (eval/kl) under {sweep_dir}; nothing to plot")
            return
        exp_name = OmegaConf.select(config, "exp_name", default="")
        data = OmegaConf.select(config, "data.name", default="sentiment")
        reward = str(OmegaConf.select(config, "reward.name", default="vader")).upper()
        title = f"Reward vs KL frontier: {exp_name} ({data}, {reward} reward)"
        csv_path, png_path = write_frontier(rows, sweep_dir, title)
        print(summary(rows, csv_path, png_path))
        if config.logger.name == "wandb":
            _log_to_wandb(config, rows, png_path, sweep_dir, title)
        print(f"next: dpo-run runs {sweep_dir}   (each job's overrides, final metrics and status)")


def _log_to_wandb(config: DictConfig, rows: list[dict], png_path: Path, sweep_dir: Path, title: str) -> None:
    """One wandb run of job_type "frontier" in the sweep's group: table, scatter chart and the PNG."""
    import wandb

    group = wandb_group(config, sweep_dir)
    run = wandb.init(
        project=config.logger.project,
        entity=config.logger.entity,
        group=group,
        job_type="frontier",
        name=f"{group}/frontier",
        tags=["frontier", f"sweep:{sweep_dir.name}"[:64]],  # wandb refuses longer tags
        dir=str(config.output_root) if "output_root" in config else str(sweep_dir),
        mode=wandb_mode(config.logger.mode),
    )
    table = wandb.Table(columns=COLUMNS, data=[[row[k] for k in COLUMNS] for row in rows])
    run.log(
        {
            "frontier/table": table,
            "frontier/scatter": wandb.plot.scatter(table, "kl", "reward", title=title),
            "frontier/plot": wandb.Image(str(png_path)),
        }
    )
    run.finish()
