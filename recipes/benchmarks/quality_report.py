"""Writes what `quality.py` measured: `quality.md` (tables, settings, versions), `quality.json` and `quality.png`."""

import json
import os
import platform
import statistics
import subprocess
import sys

import torch


def mean_std(values) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values) -> str:
    """Accuracy in %: mean ± std over seeds, or the one value."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return "{:.2f} ± {:.2f}".format(*(100 * v for v in mean_std(values)))


def versions() -> str:
    import accelerate
    import datasets
    import timm
    import transformers

    names = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "accelerate": accelerate.__version__, "datasets": datasets.__version__, "timm": timm.__version__}
    return ", ".join(f"{k} {v}" for k, v in names.items())


def commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"


def verdicts(rows: list[dict]) -> list[str]:
    """Per cell: SRM paper's margin over each other method (mean difference, and whether it exceeds both stds)."""
    lines = []
    cells = dict.fromkeys((r["size"], r["pair"]) for r in rows)
    for size, pair in cells:
        cell = {r["method"]: r for r in rows if (r["size"], r["pair"]) == (size, pair)}
        srm_mean, srm_std = mean_std(cell["SRM paper"]["test"])
        parts = []
        for name, r in cell.items():
            if name == "SRM paper":
                continue
            m, s = mean_std(r["test"])
            word = "above" if srm_mean - m > max(s, srm_std) else "below" if m - srm_mean > max(s, srm_std) else "tied"
            parts.append(f"{name} {100 * (srm_mean - m):+.2f} ({word})")
        best = max(cell, key=lambda n: statistics.mean(cell[n]["test"]))
        lines.append(f"- {size} images/class, {pair}: best mean {best}; SRM paper vs " + ", ".join(parts) + ".")
    return lines


def write_results(args, budget, rows: list[dict], ablation: list[dict], teacher_test: float, seconds: float,
                  code: str) -> None:
    quick = "_quick" if args.quick else ""
    command = f"python recipes/benchmarks/quality.py{' --quick' if args.quick else ''}"
    lines = [
        "# Quality: SRM against other distillers on Fashion-MNIST", "",
        f"Produced by `{command}` (commit {code}) in {seconds / 60:.1f} minutes, teacher training included "
        "when not cached.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads. Versions: {versions()}.", "",
        f"Teacher: ResNet-18 (timm, widths 16–128) trained on the full training split; test accuracy "
        f"{100 * teacher_test:.2f} %.", "",
        "Settings: batch {}; epochs (last stage, each extra stage) per images/class: {}; seeds {}; augmentation: "
        "random resized crop (0.8–1) and flip, the same view for teacher and student. The setting of each method is "
        "chosen by seed 0's accuracy on a stratified 20 % validation split of the training subset; accuracy is on "
        "the {} test images, in %, mean ± std over seeds.".format(
            budget.batch, {k: v for k, v in budget.epochs.items()}, list(budget.seeds),
            "first {}".format(budget.eval_samples) if budget.eval_samples else "10,000"),
        "Equal compute: the method's last stage lengthened so that it makes as many passes over the data as SRM "
        "paper (dictionary + SRM + KD stages), seeds {}.".format(list(budget.equal_compute_seeds)), "",
        "| images/class | pair | method | passes | setting (chosen on validation) | test accuracy | "
        "equal compute | seconds/run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eq = "same" if r["equal_compute_test"] is None else fmt(r["equal_compute_test"])
        lines.append(f"| {r['size']} | {r['pair']} | {r['method']} | {r['passes']} | {r['setting']} | "
                     f"**{fmt(r['test'])}** | {eq} | {statistics.mean(r['seconds']):.1f} |")
    lines += ["", "## SRM paper against each method", "",
              "Difference of means in points; 'above'/'below' when it exceeds the larger of the two stds.", "",
              *verdicts(rows)]
    if ablation:
        a = ablation[0]
        lines += ["", f"## Ablation: SRM paper, {a['pair']}, {a['size']} images/class, seeds "
                  f"{list(budget.ablation_seeds)}", "", "| variant | change | test accuracy |", "|---|---|---|"]
        lines += [f"| {a['variant']} | `{a['change']}` | {fmt(a['test'])} |" for a in ablation]
    with open(os.path.join(args.out_dir, f"quality{quick}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, f"quality{quick}.json"), "w") as f:
        json.dump({"teacher_test": teacher_test, "rows": rows, "ablation": ablation}, f, indent=2)
    plot(rows, os.path.join(args.out_dir, f"quality{quick}.png"), teacher_test)


def plot(rows: list[dict], path: str, teacher_test: float) -> None:
    """One panel per (images/class, pair): a bar per method, mean test accuracy with a ±std error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["size"], r["pair"]) for r in rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False, sharey=False)
    for ax, (size, pair) in zip(axes[0], cells):
        cell = [r for r in rows if (r["size"], r["pair"]) == (size, pair)]
        stats = [mean_std([100 * v for v in r["test"]]) for r in cell]
        colors = ["#d62728" if r["method"].startswith("SRM") else "#7f7f7f" for r in cell]
        ax.bar(range(len(cell)), [m for m, _ in stats], yerr=[s for _, s in stats], color=colors, capsize=3)
        ax.set_xticks(range(len(cell)), [r["method"] for r in cell], rotation=45, ha="right", fontsize=8)
        low = min(m - s for m, s in stats)
        ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + s for m, s in stats) + 3))
        ax.set_title(f"{size} img/class\n{pair}", fontsize=9)
        ax.set_ylabel("test accuracy (%)")
    fig.suptitle(f"Fashion-MNIST students (teacher {100 * teacher_test:.1f} %), mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit("Run recipes/benchmarks/quality.py, which calls this module.")
