"""What makes SRM win at equal measured compute? SRM variants against the baselines, on validation only.

    python recipes/benchmarks/srm_search.py                       # 100 images/class, ResNet-18 -> ResNet-10t
    python recipes/benchmarks/srm_search.py --size 10 --budget 200
    python recipes/benchmarks/srm_search.py --quick               # a few steps of each variant (the tests)

Validation: 200 images per class of the split carved from the training images (the shipped teacher never trained
on it), disjoint from the training subset. Every variant gets the same measured cost: first the time of one step of
every stage of every variant is measured on the same batch (`recipes/compute.py`); the budget is `--budget` steps
of plain KD; a variant's extra stages take their `shares` of it and its last stage the rest. The test split is never
used, so the defaults chosen here do not peek at the benchmark's test numbers. Writes
`results/srm_search_<size>.json` and `.md`.
"""

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # recipes/

from offline import go_offline_if_hub_unreachable  # noqa: E402

go_offline_if_hub_unreachable()

from compute import first_batch, stage_step_seconds  # noqa: E402
from distill import SHIPPED_TEACHER  # noqa: E402
from quality import Preprocessed, student_model  # noqa: E402
from bench_report import commit  # noqa: E402
from transformers import set_seed  # noqa: E402

from srm_hf import SRM, DistillationConfig, DistillationTrainer  # noqa: E402
from srm_hf.data import DataArguments, load_image_splits, stratified_subset  # noqa: E402
from srm_hf.loading import load_image_classifier  # noqa: E402
from srm_hf.losses import classification_loss  # noqa: E402
from srm_hf.methods.base import linear_warmup  # noqa: E402
from srm_hf.methods.dkd import dkd_loss  # noqa: E402
from srm_hf.metrics import make_compute_metrics  # noqa: E402
from srm_hf.transforms import ImageTransform, preprocessing_for  # noqa: E402


class SRMThenDKD(SRM):
    """SRM's dictionary and SRM stages, then DKD (β 2, the benchmark's choice) instead of KD as the last stage."""

    dkd_beta, dkd_warmup_ratio = 2.0, 20 / 240

    def loss(self, stage, student, teacher, labels):
        if stage.name != "kd":
            return super().loss(stage, student, teacher, labels)
        warmup = linear_warmup(stage.progress, self.dkd_warmup_ratio)
        return {"ce": classification_loss(student.logits, labels, self.label_smoothing),
                "dkd": warmup * dkd_loss(student.logits, teacher.logits, labels, 1.0, self.dkd_beta, 4.0)}


PAPER = {"method": "srm", "srm_mode": "paper", "kd_alpha": 0.9}
# the benchmark's SRM paper setting at 100 and 1,000 images per class: α 0.5, pixel CE on the logits
CHOSEN = {**PAPER, "kd_alpha": 0.5, "srm_pixel_ce_on_sigmoid": False}
# name -> (config fields, share of the budget's cost for each stage before the last one)
VARIANTS = {
    "alone, lr 3e-3": ({"method": "alone"}, {}),
    "alone, lr 1e-2": ({"method": "alone", "learning_rate": 1e-2}, {}),
    "KD α 0.9": ({"method": "kd", "kd_alpha": 0.9}, {}),
    "KD α 0.5": ({"method": "kd", "kd_alpha": 0.5}, {}),
    "DKD β 8": ({"method": "dkd"}, {}),
    "DKD β 2": ({"method": "dkd", "dkd_beta": 2.0}, {}),
    "SRM paper, shares 10/10/80": (PAPER, {"dictionary": 0.1, "srm": 0.1}),
    "SRM paper, shares 20/30/50": (PAPER, {"dictionary": 0.2, "srm": 0.3}),
    "SRM paper, shares 5/5/90": (PAPER, {"dictionary": 0.05, "srm": 0.05}),
    "SRM paper 10/10/80, α 0.5": ({**PAPER, "kd_alpha": 0.5}, {"dictionary": 0.1, "srm": 0.1}),
    "SRM paper 10/10/80, pooled tap only": ({**PAPER, "layer_pairs": ["global_pool:global_pool"]},
                                            {"dictionary": 0.1, "srm": 0.1}),
    "SRM paper 10/10/80, m 4, s 0.01": ({**PAPER, "srm_codeword_multiplier": 4.0, "srm_sparsity_multiplier": 0.01},
                                        {"dictionary": 0.1, "srm": 0.1}),
    "SRM paper 5/5/90, α 0.5": ({**PAPER, "kd_alpha": 0.5}, {"dictionary": 0.05, "srm": 0.05}),
    "SRM paper 10/10/80, α 0.5, pooled tap only": (
        {**PAPER, "kd_alpha": 0.5, "layer_pairs": ["global_pool:global_pool"]}, {"dictionary": 0.1, "srm": 0.1}),
    "SRM paper 10/10/80, α 0.5, pixel CE on logits": ({**PAPER, "kd_alpha": 0.5, "srm_pixel_ce_on_sigmoid": False},
                                                      {"dictionary": 0.1, "srm": 0.1}),
    "SRM 5/5/90, α 0.5, CE on logits": (CHOSEN, {"dictionary": 0.05, "srm": 0.05}),
    # ablations of that setting: is it the SRM stages or the KD stage that costs accuracy?
    "SRM 5/5/90, CE on logits, last stage labels only (α 0)": ({**CHOSEN, "kd_alpha": 0.0},
                                                               {"dictionary": 0.05, "srm": 0.05}),
    "SRM 5/5/90, CE on logits, last stage DKD β 2": ({**CHOSEN, "method_class": SRMThenDKD},
                                                     {"dictionary": 0.05, "srm": 0.05}),
    "SRM joint 10/90, λ 1": ({"method": "srm", "srm_mode": "joint", "kd_alpha": 0.9}, {"dictionary": 0.1}),
    "SRM joint 10/90, λ 0.1": ({"method": "srm", "srm_mode": "joint", "kd_alpha": 0.9, "srm_weight": 0.1},
                              {"dictionary": 0.1}),
}


def config_for(settings: dict, out: str, seed: int, batch: int, steps: dict[str, int] | None = None):
    """The variant's config; `steps` sizes its stages (the last one under its own name or 'last')."""
    steps, settings = steps or {}, {k: v for k, v in settings.items() if k != "method_class"}
    lengths = {"max_steps": steps.get("last", 1)}
    if "dictionary" in steps:
        lengths["srm_dictionary_max_steps"] = steps["dictionary"]
    if "srm" in steps:
        lengths["srm_max_steps"] = steps["srm"]
    return DistillationConfig(output_dir=out, seed=seed, per_device_train_batch_size=batch,
                              per_device_eval_batch_size=1000, save_strategy="no", eval_strategy="no",
                              report_to="none", disable_tqdm=True, logging_steps=100,
                              **{"learning_rate": 3e-3, **settings, **lengths})


def stage_lengths(trainer, shares: dict[str, float], seconds: dict, name: str, budget: float) -> dict[str, int]:
    """Steps per stage so that Σ steps × measured seconds per step = budget (seconds)."""
    specs = trainer.method.stages()
    steps, left = {}, budget
    for spec in specs[:-1]:
        steps[spec.name] = max(1, round(shares[spec.name] * budget / seconds[(name, spec.name)]))
        left -= steps[spec.name] * seconds[(name, spec.name)]
    steps["last"] = max(1, round(left / seconds[(name, specs[-1].name)]))
    return steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=100, help="Training images per class.")
    p.add_argument("--val_per_class", type=int, default=200, help="Validation images per class.")
    p.add_argument("--budget", type=int, default=600, help="Compute budget, in measured steps of KD.")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="Names from VARIANTS.")
    p.add_argument("--quick", action="store_true", help="A few steps per variant: checks the pipeline only.")
    p.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    p.add_argument("--work_dir", default="outputs/srm_search")
    p.add_argument("--name", default="", help="Suffix of the result files: srm_search_<size><name>.json/.md.")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.budget, args.batch, args.seeds, args.val_per_class = 4, 3, 8, [0], 4
    started, code = time.time(), commit()
    splits = load_image_splits(DataArguments())
    teacher = load_image_classifier(SHIPPED_TEACHER)
    pre = preprocessing_for(student_model(28))
    # validation: the split carved from the training images (never trained on by the shipped teacher), disjoint
    # from the training subset; larger than the subset's own 20 %, so that differences of a point are visible
    train = stratified_subset(splits.train, args.size, seed=0)
    val = stratified_subset(splits.validation, args.val_per_class, seed=0)
    train = train.with_transform(ImageTransform(pre, preprocessing_for(teacher), train=True))
    val = Preprocessed(val, pre)
    set_seed(0)
    initial = student_model(28)

    def trainer_for(settings, seed, steps=None):
        config = config_for(settings, args.work_dir, seed, args.batch, steps)
        method = settings["method_class"].from_config(config) if "method_class" in settings else None
        return DistillationTrainer(model=copy.deepcopy(initial) if steps is None else student_model(28),
                                   teacher_model=teacher, train_dataset=train, compute_metrics=make_compute_metrics(),
                                   args=config, method=method)

    # measured cost of one step of every stage of every variant, in interleaved rounds on one batch
    unit = "budget unit: KD"  # the budget is counted in steps of plain KD, measured with the variants
    probes = {name: trainer_for(VARIANTS[name][0], 0) for name in args.variants}
    probes[unit] = trainer_for({"method": "kd"}, 0)
    seconds = stage_step_seconds(probes, first_batch(next(iter(probes.values()))), rounds=2 if args.quick else 8)
    budget = args.budget * seconds[(unit, "kd")]
    rows = []
    for name in args.variants:
        settings, shares = VARIANTS[name]
        steps = stage_lengths(probes[name], shares, seconds, name, budget)
        accuracies = []
        for seed in args.seeds:
            set_seed(seed)
            trainer = trainer_for(settings, seed, steps)
            trainer.train()
            accuracies.append(trainer.evaluate(val)["eval_accuracy"])
        recorded = {k: v.__name__ if k == "method_class" else v for k, v in settings.items()}
        rows.append({"variant": name, "settings": recorded, "steps": steps, "validation": accuracies,
                     "mean": statistics.mean(accuracies),
                     "seconds_per_step": {s: seconds[(n, s)] for n, s in seconds if n == name}})
        print(json.dumps(rows[-1]), flush=True)
    write(args, rows, budget, code, time.time() - started)
    return rows


def write(args, rows, budget, code, wall):
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"srm_search_{args.size}{args.name}{'_quick' if args.quick else ''}")
    meta = {"size": args.size, "budget_kd_steps": args.budget, "budget_seconds": budget, "batch": args.batch,
            "seeds": args.seeds, "commit": code, "wall_seconds": wall,
            "command": shlex.join(["python", "recipes/benchmarks/srm_search.py", *sys.argv[1:]])}
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [f"# SRM variants at equal measured compute: {args.size} images per class, validation accuracy", "",
             f"Command: `{meta['command']}` (commit {code}, {wall / 60:.1f} min). Budget: {args.budget} measured "
             f"KD steps ({budget:.1f} s), batch {args.batch}, seeds {args.seeds}. Teacher: {SHIPPED_TEACHER}; "
             "student: ResNet-10t (widths 8-64).", "",
             "| variant | steps per stage | validation accuracy (per seed) | mean |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["mean"]):
        steps = " + ".join(f"{v}" for v in r["steps"].values())
        per_seed = ", ".join(f"{100 * a:.2f}" for a in r["validation"])
        lines.append(f"| {r['variant']} | {steps} | {per_seed} | {100 * r['mean']:.2f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
