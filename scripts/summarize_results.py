"""Summarise a frontier reproduction (scripts/reproduce_frontier.sh) into results.md and learning curves.

    python scripts/summarize_results.py outputs/sentiment_frontier [--wall-minutes M]

Reads the experiment's frontier.csv (written by `dpo-run plot`) and its run dirs; writes
<root>/results.md (final point of every run with fluency, seed spreads, wall time) and
<root>/learning_curves.png (train reward accuracy and eval reward over steps), and prints results.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from dpo_cli.frontier import gather_points
from dpo_cli.logging import read_metrics


def _fmt(value: str | float | None, se: str | float | None = None, digits: int = 3) -> str:
    if value in (None, ""):
        return ""
    text = f"{float(value):.{digits}f}"
    return f"{text} +/- {float(se):.{digits}f}" if se not in (None, "") else text


def final_points_table(rows: list[dict]) -> list[str]:
    header = ["method", "run", "final KL (nats)", "final reward", "paired change vs step 0"]
    header += ["ref log-prob/token", "distinct-2"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in sorted((r for r in rows if r["is_final"] in (True, "True")), key=lambda r: float(r["kl"])):
        cells = [row["label"], Path(row["run_dir"]).name, _fmt(row["kl"], row["kl_se"], 2)]
        cells += [_fmt(row["reward"], row["reward_se"]), _fmt(row["reward_delta"], row["reward_delta_se"])]
        cells += [_fmt(row["ref_logp_per_token"], digits=2), _fmt(row["distinct_2"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def final_reward(run_dir: Path) -> float:
    return [m for m in read_metrics(run_dir) if "eval/reward" in m][-1]["eval/reward"]


def seed_spreads(root: Path) -> list[str]:
    """Training seeds (same sampling) vs sampling seeds (same checkpoint) of DPO beta=0.1."""
    training = [final_reward(p) for p in sorted(root.glob("dpo/multirun-*/dpo_beta0.1_seed*"))]
    sampling = [final_reward(p) for p in sorted(root.glob("eval/dpo_beta0.1_sampling_seed*"))]
    lines = []
    for name, values in (("training seeds", training), ("sampling seeds", sampling)):
        if len(values) >= 2:
            lines.append(
                f"- DPO beta=0.1 over {len(values)} {name}: final reward "
                f"{', '.join(f'{v:.3f}' for v in values)} (std {statistics.stdev(values):.3f})"
            )
    return lines


def reward_model_accuracy(root: Path) -> list[str]:
    """The held-out pair accuracy of the reward model PPO trained on (`dpo-run rm`)."""
    lines = []
    for run_dir in sorted(p.parent for p in root.glob("rm/*/metrics.jsonl")):
        evals = [m for m in read_metrics(run_dir) if "eval/rewards/accuracies" in m]
        if evals:
            first, last = evals[0]["eval/rewards/accuracies"], evals[-1]["eval/rewards/accuracies"]
            lines.append(
                f"- Reward model ({run_dir.name}): held-out pair accuracy {first:.3f} at step 0, {last:.3f} "
                f"at step {evals[-1]['step']}"
            )
    return lines


def plot_learning_curves(root: Path, out: Path) -> None:
    """Train implicit-reward accuracy, held-out reward and fluency (reference log-prob/token) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, reward_ax, fluency_ax) = plt.subplots(1, 3, figsize=(19, 5.5))
    runs = sorted(root.glob("dpo/multirun-*/*/metrics.jsonl")) + sorted(root.glob("ppo/**/metrics.jsonl"))
    colors = plt.get_cmap("tab20")
    for k, metrics_file in enumerate(runs):
        # The run dir name carries the method, hyperparameter and seed (dpo_beta0.1_seed1).
        label, color = metrics_file.parent.name, colors(k % 20)
        metrics = read_metrics(metrics_file.parent)
        train = [m for m in metrics if "train/rewards/accuracies" in m]
        # A 5-step running mean: single 8-pair batches are too noisy to read.
        smoothed = [statistics.mean(m["train/rewards/accuracies"] for m in train[max(0, i - 4) : i + 1])
                    for i in range(len(train))]  # fmt: skip
        acc_ax.plot([m["step"] for m in train], smoothed, label=label, linewidth=1, color=color)
        evals = [m for m in metrics if "eval/reward" in m]
        steps = [m["step"] for m in evals]
        rewards, errors = [m["eval/reward"] for m in evals], [m["eval/reward_se"] for m in evals]
        reward_ax.errorbar(steps, rewards, yerr=errors, label=label, marker="o", capsize=2, color=color)
        fluency_ax.plot(steps, [m["eval/ref_logp_per_token"] for m in evals], marker="o", color=color)
    acc_ax.set(xlabel="step", ylabel="train implicit-reward accuracy (5-step mean)", title="Learning curves")
    reward_ax.set(
        xlabel="step", ylabel="held-out reward (mean, +/- s.e.)", title="Reward of samples over training"
    )
    fluency_ax.set(
        xlabel="step",
        ylabel="log pi_ref(y|x) per token of the samples [nats]",
        title="Fluency: reference log-prob of samples",
    )
    for ax in (acc_ax, reward_ax, fluency_ax):
        ax.grid(True, alpha=0.3)
    fluency_ax.legend(*reward_ax.get_legend_handles_labels(), fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the experiment dir, e.g. outputs/sentiment_frontier")
    parser.add_argument("--wall-minutes", type=int, default=None, help="wall time of the whole reproduction")
    args = parser.parse_args()
    frontier_csv = args.root / "frontier.csv"
    rows = list(csv.DictReader(frontier_csv.open())) if frontier_csv.exists() else gather_points([args.root])
    plot_learning_curves(args.root, args.root / "learning_curves.png")
    lines = [f"# Results: {args.root.name}", ""]
    if args.wall_minutes is not None:
        lines += [f"Wall time of the whole reproduction: {args.wall_minutes} min.", ""]
    lines += final_points_table(rows) + [""] + seed_spreads(args.root) + reward_model_accuracy(args.root)
    lines += ["", "Figures: frontier.png, learning_curves.png"]
    (args.root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
