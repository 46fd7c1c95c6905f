"""Writes what `quality.py` measured: `quality.md` (tables, settings, versions), `quality.json` and `quality.png`."""

import json
import os
import platform
import statistics
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


def at_equal_compute(row: dict) -> list[float]:
    """A method's test accuracies at SRM paper's measured cost: its lengthened (or shortened) runs, or its own when
    it costs the same."""
    return row["equal_compute_test"] if row["equal_compute_test"] is not None else row["test"]


def compare(a: list[float], b: list[float]) -> tuple[float, str]:
    """Mean difference a - b in points, and 'above' / 'below' when it exceeds the larger std, else 'tied'."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    word = "above" if ma - mb > max(sa, sb) else "below" if mb - ma > max(sa, sb) else "tied"
    return 100 * (ma - mb), word


def verdicts(rows: list[dict]) -> list[str]:
    """Per cell, at equal measured compute: the best SRM configuration against the best other method, and SRM paper
    against every method."""
    lines = []
    for pair, size in dict.fromkeys((r["pair"], r["size"]) for r in rows):
        cell = {r["method"]: r for r in rows if (r["pair"], r["size"]) == (pair, size)}
        best = lambda names: max(names, key=lambda n: statistics.mean(at_equal_compute(cell[n])))  # noqa: E731
        srm = best([n for n in cell if n.startswith("SRM")])
        other = best([n for n in cell if not n.startswith("SRM")])
        diff, word = compare(at_equal_compute(cell[srm]), at_equal_compute(cell[other]))
        parts = ", ".join("{} {:+.2f} ({})".format(n, *compare(cell["SRM paper"]["test"], at_equal_compute(r)))
                          for n, r in cell.items() if n != "SRM paper")
        lines.append(f"- {size} images/class, {pair}: best SRM ({srm}) vs best other ({other}): {diff:+.2f} points "
                     f"({word}). SRM paper vs each: {parts}.")
    return lines


# srm_search.py runs that ask why SRM falls behind, by (images/class, budget in KD steps): the same variants at one
# budget and at four times it, on validation (commands in each file and in README.md)
ABLATIONS = ("srm_search_1000_b600", "srm_search_1000_b2400", "srm_search_100_b1000", "srm_search_100_b4000")
ALONE, KD_05, DKD_2 = "alone, lr 1e-2", "KD α 0.5", "DKD β 2"
SRM_KD = "SRM 5/5/90, α 0.5, CE on logits"
SRM_CE = "SRM 5/5/90, CE on logits, last stage labels only (α 0)"
SRM_DKD = "SRM 5/5/90, CE on logits, last stage DKD β 2"


def ablation_section(out_dir: str) -> list[str]:
    """The ablation runs found in `out_dir`: a table of validation means and the differences that answer 'why'."""
    runs = {}
    for name in ABLATIONS:
        path = os.path.join(out_dir, name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                runs[name] = json.load(f)
    if not runs:
        return []
    columns = [(r["meta"]["size"], r["meta"]["budget_kd_steps"], {row["variant"]: row for row in r["rows"]})
               for r in runs.values()]
    variants = list(dict.fromkeys(v for *_, rows in columns for v in rows))
    lines = ["", "## Why SRM falls behind with more data: ablations on validation", "",
             "`recipes/benchmarks/srm_search.py`, 28 px pair, validation split (200 images per class carved from the "
             "training images; the test split is not used), mean of 2 seeds, every variant at the same measured "
             "cost within a column: the budget is that many measured steps of plain KD. Each column is one "
             "invocation (its command is in `results/<file>.md`). Files: "
             + ", ".join(f"`{n}.md`" for n in runs) + ".", "",
             "| variant | " + " | ".join(f"{size} img/class, {budget} KD steps" for size, budget, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for v in variants:
        cells = [f"{100 * rows[v]['mean']:.2f} ({' + '.join(str(x) for x in rows[v]['steps'].values())})"
                 if v in rows else "—" for *_, rows in columns]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Steps per stage in brackets. Differences in points (validation means): the student alone against "
              "the best method that runs the teacher to the end; SRM against the logit loss it ends with, at the "
              "same settings (does the feature stage add to it?); SRM's feature stages followed by labels only "
              "against the student alone (does the feature knowledge help on its own?).", ""]
    for size, budget, rows in columns:
        if not {ALONE, KD_05, DKD_2, SRM_KD, SRM_CE, SRM_DKD} <= set(rows):
            continue
        mean = lambda v: 100 * rows[v]["mean"]  # noqa: E731
        best = max((v for v in rows if v not in (ALONE, SRM_CE) and not v.startswith("alone")), key=mean)
        lines.append(
            f"- {size} img/class, {budget} KD steps: alone {mean(ALONE) - mean(best):+.2f} against {best}; "
            f"SRM then KD {mean(SRM_KD) - mean(KD_05):+.2f} against {KD_05}; SRM then DKD "
            f"{mean(SRM_DKD) - mean(DKD_2):+.2f} against {DKD_2}; SRM then labels only "
            f"{mean(SRM_CE) - mean(ALONE):+.2f} against alone.")
    return lines


def write_results(args, budget, extra: float, rows: list[dict], teachers: dict[str, float], seconds: float,
                  code: str, step_scales: dict[str, float]) -> None:
    quick = "_quick" if args.quick else ""
    command = f"python recipes/benchmarks/quality.py{' --quick' if args.quick else ''}"
    lines = [
        "# Quality: SRM against other distillers on Fashion-MNIST, at equal measured compute", "",
        f"Produced by `{command}` (commit {code}); this invocation took {seconds / 60:.1f} minutes (runs finished "
        "by an earlier, interrupted invocation are read back from its runs file).",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads. Versions: {versions()}.", "",
        "Teachers (shipped, recipes/teachers/), test accuracy: "
        + "; ".join(f"{p}: {100 * a:.2f} %" for p, a in teachers.items()) + ".", "",
        "Protocol: last stage {} steps (batch) per images/class{}; stages before it {:g} % "
        "of that each; seeds {}; augmentation: random resized crop (0.8–1) and flip, the same view for teacher and "
        "student. In every cell each method tries {} settings with seed 0, chosen on {} validation images per class "
        "(never the test split). Accuracy on the {} test images, in %, mean ± std over seeds. **Equal compute**: "
        "one optimizer step of every stage of every method is timed on the same batch in interleaved rounds before "
        "each cell; every method's last stage is lengthened (shortened, for a method that costs more) until its "
        "measured cost equals SRM paper's. SRM reference's validation passes (its model selection) are not counted as training "
        "compute.".format({k: v for k, v in budget.steps.items()},
                          "".join(f", {100 * v:g} % of that for {k}" for k, v in step_scales.items() if v != 1),
                          100 * extra, list(budget.seeds),
                          len(next(iter(rows))["validation"]), budget.val_per_class,
                          "first {}".format(budget.test_samples) if budget.test_samples else "10,000"), "",
        "| pair | images/class | method | setting (validation) | steps | measured cost (s) | test, own budget | "
        "steps at equal compute | test, equal compute |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eq_steps = "—" if r["equal_compute_steps"] is None else str(r["equal_compute_steps"])
        eq = "(same cost)" if r["equal_compute_test"] is None else f"**{fmt(r['equal_compute_test'])}**"
        steps = " + ".join(str(s) for s in r["steps"])
        lines.append(f"| {r['pair']} | {r['size']} | {r['method']} | `{r['setting']}` | {steps} | "
                     f"{r['cost_seconds']:.1f} | {fmt(r['test'])} | {eq_steps} | {eq} |")
    lines += ["", "## At equal measured compute", "",
              "Difference of means in points; 'above'/'below' when it exceeds the larger of the two stds, else "
              "'tied'.", "", *verdicts(rows), *ablation_section(args.out_dir)]
    with open(os.path.join(args.out_dir, f"quality{quick}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, f"quality{quick}.json"), "w") as f:
        json.dump({"teachers_test": teachers, "rows": rows}, f, indent=2)
    plot(rows, os.path.join(args.out_dir, f"quality{quick}.png"))


def plot(rows: list[dict], path: str) -> None:
    """One panel per (pair, images/class): a bar per method at equal compute, mean test accuracy ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["pair"], r["size"]) for r in rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False, sharey=False)
    for ax, (pair, size) in zip(axes[0], cells):
        cell = [r for r in rows if (r["pair"], r["size"]) == (pair, size)]
        stats = [mean_std([100 * v for v in at_equal_compute(r)]) for r in cell]
        colors = ["#d62728" if r["method"].startswith("SRM") else "#7f7f7f" for r in cell]
        ax.bar(range(len(cell)), [m for m, _ in stats], yerr=[s for _, s in stats], color=colors, capsize=3)
        ax.set_xticks(range(len(cell)), [r["method"] for r in cell], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(max(0.0, min(m - s for m, s in stats) - 5), min(100.0, max(m + s for m, s in stats) + 3))
        ax.set_title(f"{size} img/class\n{pair}", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
    fig.suptitle("Fashion-MNIST students at equal measured compute, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit("Run recipes/benchmarks/quality.py, which calls this module.")
