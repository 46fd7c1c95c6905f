"""Does the fused path train the same students? SRM's runs of the quality benchmark, again through the kernels.

    python recipes/benchmarks/fused_quality.py                       # on a GPU: the kernels run natively
    TRITON_INTERPRET=1 python recipes/benchmarks/fused_quality.py    # on the CPU, through Triton's interpreter (slow)
    python recipes/benchmarks/fused_quality.py --cells "ResNet-18 → ResNet-10t, 28 px|100" --methods "SRM joint"

For each cell of `quality.py` (a pair and images per class) and SRM method, reads the method's finished runs at its
own budget from `results/quality_runs.jsonl` (the recorded accuracies), takes the setting its seeds ran with and
trains the same runs again with this commit (setting, seeds, steps, data, teacher), once with
`srm_kernels="eager"` and once with `"triton"`: the teacher's targets, the student's SRM loss and stage 1's codes
and MSE through the Triton kernels. The kernels round differently from the eager maths, which training amplifies as
it would any change of summation order: the question is whether the fused accuracies stay within the eager seeds'
spread, not whether they are equal. Each finished run is appended to `--runs` (a restarted script skips it); the
tables go to `--out`.
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import quality  # noqa: E402  (goes offline when the Hub is unreachable, puts recipes/ on the path)
from bench_report import write_report  # noqa: E402
from quality_report import fmt  # noqa: E402
from run_cache import Runs  # noqa: E402

from srm_hf.data import DataArguments, load_image_splits  # noqa: E402
from srm_hf.transforms import preprocessing_for  # noqa: E402

SRM_METHODS = [name for name, method in quality.METHODS.items() if method["method"] == "srm"]


def recorded_runs(runs: Runs, pair_name: str, size: int, method: str) -> tuple[str, dict, dict[int, float]]:
    """(cell key, the setting the method's seeds ran with, {seed: test accuracy}) of its finished runs."""
    by_setting: dict[str, dict[int, float]] = {}
    cell_key = None
    for key, value in runs.done.items():
        parts = key.split("|")
        if parts[:2] == [pair_name, str(size)] and len(parts) == 7 and parts[3] == method and parts[6] == "own":
            by_setting.setdefault(parts[4], {})[int(parts[5])] = value["test"]
            cell_key = "|".join(parts[:3])
    if not by_setting:
        raise SystemExit(f"No finished {method} runs for {pair_name!r} with {size} images/class in {runs.path}: run "
                         "recipes/benchmarks/quality.py first, or name a finished cell with --cells.")
    setting = max(by_setting, key=lambda s: len(by_setting[s]))  # the chosen setting has every seed
    return cell_key, json.loads(setting), dict(sorted(by_setting[setting].items()))


def parse_cell(p: argparse.ArgumentParser, text: str, budget) -> tuple[str, int]:
    pair_name, _, size = text.rpartition("|")
    if pair_name not in quality.PAIRS or not size.isdigit() or int(size) not in budget.steps:
        p.error(f"--cells {text!r} is not PAIR|IMAGES_PER_CLASS with a pair of quality.py ({list(quality.PAIRS)}) "
                f"and images per class in {list(budget.steps)}.")
    return pair_name, int(size)


def compare(cell, cell_key: str, method: str, setting: dict, recorded: dict[int, float],
            runs: Runs) -> tuple[list[str], dict[str, dict[int, float]]]:
    """Train the recorded runs again, eager and through the kernels: (the table of one cell and method,
    {"recorded" | "eager" | "triton": {seed: test accuracy}})."""
    acc = {"recorded": recorded}
    for kernels in ("eager", "triton"):
        fields = {**quality.METHODS[method], "srm_kernels": kernels}
        acc[kernels] = {seed: runs.get(f"{cell_key}|{method}|{json.dumps(setting)}|{seed}|{kernels}",
                                       lambda seed=seed: cell.run(fields, setting, seed, cell.last))["test"]
                        for seed in recorded}
    lines = [f"## {cell_key.split('|')[0]}, {cell_key.split('|')[1]} images/class: {method}", "",
             f"Setting {json.dumps(setting)}, last stage {cell.last} steps × batch {cell.batch}.", "",
             "| seed | recorded (quality.py) | eager | fused | fused − eager |", "|---|---|---|---|---|"]
    lines += [f"| {seed} | {100 * recorded[seed]:.2f} | {100 * acc['eager'][seed]:.2f} | "
              f"{100 * acc['triton'][seed]:.2f} | {100 * (acc['triton'][seed] - acc['eager'][seed]):+.2f} |"
              for seed in recorded]
    means = {name: statistics.mean(values.values()) for name, values in acc.items()}
    lines += ["| mean ± std | " + " | ".join(fmt(list(acc[name].values())) for name in acc) +
              f" | {100 * (means['triton'] - means['eager']):+.2f} |", ""]
    return lines, acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="+", default=["ResNet-18 → ResNet-10t, 56 px (14×14 taps)|100"],
                   help="PAIR|IMAGES_PER_CLASS cells of quality.py (pairs: " + "; ".join(quality.PAIRS) + ").")
    p.add_argument("--methods", nargs="+", default=["SRM paper"], choices=SRM_METHODS)
    p.add_argument("--recorded_runs", default=os.path.join(HERE, "results", "quality_runs.jsonl"),
                   help="The runs file of quality.py: which settings, seeds and steps to train again.")
    p.add_argument("--runs", default=os.path.join(HERE, "results", "fused_quality_runs.jsonl"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "fused_quality.md"))
    p.add_argument("--work_dir", default="outputs/benchmarks/fused_quality")
    p.add_argument("--quick", action="store_true", help="The runs of `quality.py --quick` (checks the pipeline only).")
    args = p.parse_args(argv)
    budget = quality.QUICK if args.quick else quality.FULL
    cells = [parse_cell(p, text, budget) for text in args.cells]
    recorded_file = Runs(args.recorded_runs, read_only=True)
    found = {(c, m): recorded_runs(recorded_file, *c, m) for c in cells for m in args.methods}  # all, before training

    splits = load_image_splits(DataArguments(max_eval_samples=budget.test_samples))
    interpreted = " (through Triton’s interpreter on the CPU)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    lines = ["# Quality with the fused kernels", "",
             f"Test accuracy (%) on the {len(splits.test)} test images. Recorded: the runs of `quality.py` "
             f"({os.path.relpath(args.recorded_runs, HERE)}); eager and fused: the same runs trained again by this "
             f"commit with `srm_kernels=\"eager\"` and `\"triton\"`{interpreted}.", ""]
    built = {}  # every cell and its budget checked before any training
    for pair_name, size in cells:
        pair = quality.PAIRS[pair_name]
        evals = {"test": quality.Preprocessed(splits.test, preprocessing_for(quality.student_model(pair.size)))}
        built[pair_name, size] = cell = quality.Cell(pair, size, splits, budget, args.work_dir, evals)
        for method in args.methods:
            if found[(pair_name, size), method][0] != f"{pair_name}|{size}|{cell.last}x{cell.batch}":
                raise SystemExit(f"The recorded runs ({found[(pair_name, size), method][0]}) used another budget than "
                                 f"quality.py's now ({cell.last} steps × batch {cell.batch}): rerun quality.py's cell "
                                 "first.")
    runs, results = Runs(args.runs), {}
    for (cell_name, method), (cell_key, setting, recorded) in found.items():
        table, results[(*cell_name, method)] = compare(built[cell_name], cell_key, method, setting, recorded, runs)
        lines += table
    write_report(args.out, lines, "fused_quality.py", argv)
    return results


if __name__ == "__main__":
    main()
