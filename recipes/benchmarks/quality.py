"""Does SRM beat the other distillers? Fashion-MNIST with 10 and 100 training images per class.

    python recipes/benchmarks/quality.py            # full run: writes recipes/benchmarks/results/quality.{md,png}
    python recipes/benchmarks/quality.py --quick    # every method for a few steps (the test suite runs this)

One teacher (trained once on the full training split, cached) and two students: a smaller ResNet (same family)
and a tiny EfficientNet (MobileNet-style blocks, other widths). Every method uses the same trainer, taps, data and
augmentation; only the loss differs. Each method tries the same number of settings (`GRID`), chosen on a
validation split carved from the training subset (stratified), never on the test set; the chosen setting is then
run with every seed and evaluated on the full 10,000-image test split.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # recipes/

from offline import go_offline_if_hub_unreachable  # noqa: E402

go_offline_if_hub_unreachable()

import torch  # noqa: E402
from train_teacher import FASHION_MNIST_INPUT, TeacherArguments, train_teacher  # noqa: E402
from transformers import Trainer, TrainingArguments, set_seed  # noqa: E402

from srm_hf import DistillationConfig, DistillationTrainer  # noqa: E402
from srm_hf.data import DataArguments, load_image_splits, stratified_split, stratified_subset  # noqa: E402
from srm_hf.metrics import make_compute_metrics  # noqa: E402
from srm_hf.models import for_trainer, load_image_classifier  # noqa: E402
from srm_hf.transforms import ImageTransform, preprocessing_for  # noqa: E402

STUDENTS = {
    "ResNet-18 → ResNet-10t": ("timm:resnet10t", {"channels": [8, 16, 32, 64], "stem_width": 8}),
    "ResNet-18 → EfficientNet (tiny)": ("timm:test_efficientnet", {}),
}
METHODS = {
    "alone": {"method": "none"},
    "KD": {"method": "kd"},
    "FitNet": {"method": "fitnet"},
    "AT": {"method": "at"},
    "SRM paper": {"method": "srm", "mode": "paper"},
    "SRM joint": {"method": "srm", "mode": "joint"},
}
# Two settings per method, picked on validation: the student alone tunes its learning rate, the others α.
GRID = {name: ([{"learning_rate": lr} for lr in (1e-3, 3e-3)] if name == "alone"
               else [{"kd_alpha": a} for a in (0.5, 0.9)]) for name in METHODS}


@dataclasses.dataclass
class Budget:
    final_epochs: int  # the last stage of every method (KD, AT, joint, alone)
    extra_epochs: int  # each extra stage: SRM dictionary and SRM initialisation, FitNet hints
    batch: int
    eval_samples: int | None  # None: the full test split
    seeds: tuple[int, ...]
    sizes: tuple[int, ...]


FULL = Budget(final_epochs=30, extra_epochs=10, batch=64, eval_samples=None, seeds=(0, 1, 2), sizes=(10, 100))
QUICK = Budget(final_epochs=1, extra_epochs=1, batch=16, eval_samples=64, seeds=(0,), sizes=(4,))


def student_model(spec, num_labels):
    name, kwargs = spec
    return load_image_classifier(name, num_labels=num_labels, pretrained=False, in_chans=1,
                                 pretrained_cfg_overlay=FASHION_MNIST_INPUT, **kwargs)


def passes(method: dict, budget: Budget) -> int:
    """Passes over the training subset that a method's plan makes (stages included)."""
    extra = {"srm": 2 if method.get("mode", "paper") == "paper" else 1, "fitnet": 1}.get(method["method"], 0)
    return budget.final_epochs + extra * budget.extra_epochs


def run(teacher, spec, method: dict, setting: dict, train, val, test, seed: int, budget: Budget, out: str,
        final_epochs: int | None = None) -> dict:
    set_seed(seed)
    student = student_model(spec, num_labels=10)
    pre = preprocessing_for(student)
    config = DistillationConfig(
        output_dir=out, seed=seed, per_device_train_batch_size=budget.batch, per_device_eval_batch_size=512,
        num_train_epochs=final_epochs or budget.final_epochs, dictionary_epochs=budget.extra_epochs,
        srm_epochs=budget.extra_epochs, hint_epochs=budget.extra_epochs, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, logging_steps=50, **{"learning_rate": 3e-3, **method, **setting},
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=train.with_transform(ImageTransform(pre, train=True)),
                                  compute_metrics=make_compute_metrics())
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    evaluate = lambda ds: trainer.evaluate(ds.with_transform(ImageTransform(pre)))["eval_accuracy"]  # noqa: E731
    return {"val": evaluate(val), "test": evaluate(test) if test is not None else None, "seconds": seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Every method for a few steps: checks the pipeline only.")
    p.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    p.add_argument("--work_dir", default="outputs/benchmarks")
    args = p.parse_args(argv)
    budget = QUICK if args.quick else FULL
    os.makedirs(args.out_dir, exist_ok=True)
    data = DataArguments(max_eval_samples=budget.eval_samples)
    splits = load_image_splits(data)
    teacher_args = TeacherArguments(teacher_max_steps=3 if args.quick else -1)
    base = TrainingArguments(output_dir=args.work_dir, per_device_train_batch_size=128, per_device_eval_batch_size=512,
                             report_to="none", disable_tqdm=True, seed=0, remove_unused_columns=False)
    teacher_dir = train_teacher(teacher_args, data, base, os.path.join(args.work_dir, "teacher"))
    teacher = load_image_classifier(teacher_dir, num_labels=10)
    teacher_test = Trainer(model=for_trainer(teacher), args=base, compute_metrics=make_compute_metrics(),
                           eval_dataset=splits.test.with_transform(ImageTransform(preprocessing_for(teacher))),
                           ).evaluate()["eval_accuracy"]

    rows = []
    for size in budget.sizes:
        train, val = stratified_split(stratified_subset(splits.train, size, seed=0), 0.2, seed=0)
        for pair, spec in STUDENTS.items():
            for name, method in METHODS.items():
                # choose the setting on validation (seed 0), then run every seed with it
                scores = [run(teacher, spec, method, s, train, val, None, 0, budget, args.work_dir)["val"]
                          for s in GRID[name]]
                setting = GRID[name][max(range(len(scores)), key=scores.__getitem__)]
                results = [run(teacher, spec, method, setting, train, val, splits.test, seed, budget, args.work_dir)
                           for seed in budget.seeds]
                equal = None
                if passes(method, budget) < passes(METHODS["SRM paper"], budget):
                    extra = passes(METHODS["SRM paper"], budget) - passes(method, budget)
                    equal = [run(teacher, spec, method, setting, train, val, splits.test, seed, budget, args.work_dir,
                                 final_epochs=budget.final_epochs + extra)["test"] for seed in budget.seeds]
                rows.append({"size": size, "pair": pair, "method": name, "setting": setting,
                             "validation": scores, "test": [r["test"] for r in results],
                             "seconds": [r["seconds"] for r in results], "equal_compute_test": equal})
                print(json.dumps(rows[-1]))
    write_results(args, rows, teacher_test)
    return rows


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_results(args, rows: list[dict], teacher_test: float) -> None:
    lines = ["# Quality: SRM against other distillers on Fashion-MNIST", "",
             f"Command: `python recipes/benchmarks/quality.py{' --quick' if args.quick else ''}`; "
             f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}.", "",
             f"Teacher (ResNet-18, full training split) test accuracy: {teacher_test:.4f}.", "",
             "| images/class | pair | method | setting (chosen on validation) | test accuracy, mean ± std | "
             "equal compute | seconds/run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, s = mean_std(r["test"])
        eq = "same" if r["equal_compute_test"] is None else "{:.4f} ± {:.4f}".format(*mean_std(r["equal_compute_test"]))
        lines.append(f"| {r['size']} | {r['pair']} | {r['method']} | {r['setting']} | {m:.4f} ± {s:.4f} | {eq} | "
                     f"{statistics.mean(r['seconds']):.1f} |")
    with open(os.path.join(args.out_dir, "quality_quick.md" if args.quick else "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, "quality_quick.json" if args.quick else "quality.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
