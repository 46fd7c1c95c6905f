"""Does SRM beat the other distillers? Fashion-MNIST with 10 and 100 training images per class.

    python recipes/benchmarks/quality.py            # full run: writes recipes/benchmarks/results/quality.{md,json,png}
    python recipes/benchmarks/quality.py --quick    # every method for a few steps (the test suite runs this)

One teacher (trained once on the full training split, cached) and two students: a smaller ResNet (same family)
and a tiny EfficientNet (MobileNet-style blocks, other widths). Every method uses the same trainer, taps, data and
augmentation; only the loss differs. Each method tries the same number of settings (`GRID`) with seed 0, chosen on
a validation split carved from the training subset (stratified), never on the test set; the chosen setting then
runs with the other seeds, and every seed is evaluated on the full 10,000-image test split. The ablation varies one
SRM choice at a time around the default on the within-family pair.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # recipes/

from offline import go_offline_if_hub_unreachable  # noqa: E402

go_offline_if_hub_unreachable()

import torch  # noqa: E402
from quality_report import commit, write_results  # noqa: E402
from train_teacher import FASHION_MNIST_INPUT, TeacherArguments, train_teacher  # noqa: E402
from transformers import Trainer, TrainingArguments, set_seed  # noqa: E402

from srm_hf import DistillationConfig, DistillationTrainer  # noqa: E402
from srm_hf.data import DataArguments, load_image_splits, stratified_split, stratified_subset  # noqa: E402
from srm_hf.loading import for_trainer, load_image_classifier  # noqa: E402
from srm_hf.metrics import make_compute_metrics  # noqa: E402
from srm_hf.transforms import ImageTransform, preprocessing_for  # noqa: E402

STUDENTS = {
    "ResNet-18 → ResNet-10t": ("timm:resnet10t", {"channels": [8, 16, 32, 64], "stem_width": 8}),
    "ResNet-18 → EfficientNet (tiny)": ("timm:test_efficientnet", {}),
}
METHODS = {
    "alone": {"method": "alone"},
    "KD": {"method": "kd"},
    "DKD": {"method": "dkd"},
    "FitNet": {"method": "fitnet"},
    "AT": {"method": "at"},
    "ReviewKD": {"method": "reviewkd"},
    "SRM paper": {"method": "srm", "srm_mode": "paper"},
    "SRM joint": {"method": "srm", "srm_mode": "joint"},
}
# Two settings per method, picked on validation: the student alone tunes its learning rate, DKD its β (mdistiller's
# CIFAR-100 range), ReviewKD its loss weight (the authors' range), the others KD's α.
GRID = {name: [{"kd_alpha": a} for a in (0.5, 0.9)] for name in METHODS} | {
    "alone": [{"learning_rate": lr} for lr in (1e-3, 3e-3)],
    "DKD": [{"dkd_beta": b} for b in (2.0, 8.0)],
    "ReviewKD": [{"reviewkd_weight": w} for w in (1.0, 5.0)],
}
# One change at a time to SRM paper (with its chosen setting), on the first pair.
ABLATION = {
    "default: paper, all taps, m=2, s=0.02": {},
    "taps: pooled vector only": {"layer_pairs": ["global_pool:global_pool"]},
    "taps: feature maps only": {"layer_pairs": [f"layer{i}:layer{i}" for i in range(1, 5)]},
    "m = 1.5": {"srm_codeword_multiplier": 1.5},
    "m = 4": {"srm_codeword_multiplier": 4.0},
    "s = 0.01": {"srm_sparsity_multiplier": 0.01},
    "s = 0.03": {"srm_sparsity_multiplier": 0.03},
    "pixel CE on raw logits": {"srm_pixel_ce_on_sigmoid": False},
    "stage 3 without KD (α = 0)": {"kd_alpha": 0.0},
}


@dataclasses.dataclass
class Budget:
    epochs: dict[int, tuple[int, int]]  # images/class -> (last stage epochs, epochs of each extra stage)
    batch: int
    eval_samples: int | None  # None: the full test split
    seeds: tuple[int, ...]
    equal_compute_seeds: tuple[int, ...]
    ablation_size: int
    ablation_seeds: tuple[int, ...]


# Both sizes see about the same number of images per stage (80 epochs of 80 images ~ 10 epochs of 800).
FULL = Budget(epochs={10: (80, 40), 100: (10, 5)}, batch=64, eval_samples=None, seeds=(0, 1, 2),
              equal_compute_seeds=(0,), ablation_size=100, ablation_seeds=(0, 1))
QUICK = Budget(epochs={4: (1, 1)}, batch=16, eval_samples=64, seeds=(0, 1), equal_compute_seeds=(0,), ablation_size=4,
               ablation_seeds=(0,))


def student_model(spec, num_labels):
    name, kwargs = spec
    return load_image_classifier(name, num_labels=num_labels, pretrained=False, in_chans=1,
                                 pretrained_cfg_overlay=FASHION_MNIST_INPUT, **kwargs)


def passes(method: dict, final: int, extra: int) -> int:
    """Passes over the training subset that a method's plan makes (stages included)."""
    stages = {"srm": 2 if method.get("srm_mode", "paper") == "paper" else 1, "fitnet": 1}.get(method["method"], 0)
    return final + stages * extra


def stage_epochs(method: dict, extra: int) -> dict:
    """Epochs of the stages before the last one, for the methods that have them."""
    return {"srm": {"srm_dictionary_epochs": extra, "srm_epochs": extra},
            "fitnet": {"fitnet_epochs": extra}}.get(method["method"], {})


class Preprocessed(torch.utils.data.Dataset):
    """An eval split transformed once (the eval transform is deterministic), shared by every run."""

    def __init__(self, dataset, pre):
        batch = dataset.with_transform(ImageTransform(pre))[:]
        self.x, self.y = torch.stack(batch["pixel_values"]), torch.as_tensor(batch["labels"])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def run(teacher, spec, method: dict, setting: dict, train, evals: dict, seed: int, budget: Budget, size: int,
        out: str, final_epochs: int | None = None) -> dict:
    set_seed(seed)
    student = student_model(spec, num_labels=10)
    final, extra = budget.epochs[size]
    config = DistillationConfig(
        output_dir=out, seed=seed, per_device_train_batch_size=budget.batch, per_device_eval_batch_size=1000,
        num_train_epochs=final_epochs or final, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, logging_steps=50,
        **{"learning_rate": 3e-3, **stage_epochs(method, extra), **method, **setting},
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=train.with_transform(ImageTransform(preprocessing_for(student),
                                                                                    train=True)),
                                  compute_metrics=make_compute_metrics())
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    return {name: trainer.evaluate(ds)["eval_accuracy"] for name, ds in evals.items()} | {"seconds": seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Every method for a few steps: checks the pipeline only.")
    p.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    p.add_argument("--work_dir", default="outputs/benchmarks")
    args = p.parse_args(argv)
    budget = QUICK if args.quick else FULL
    started, code = time.time(), commit()  # the code that runs, before anything can change the checkout
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
    # Both students take the same 1x28x28 input, so one preprocessed test split serves every run.
    (pre,) = {preprocessing_for(student_model(spec, 10)) for spec in STUDENTS.values()}
    test = Preprocessed(splits.test, pre)

    rows, ablation = [], []
    for size, (final, extra) in budget.epochs.items():
        train, val = stratified_split(stratified_subset(splits.train, size, seed=0), 0.2, seed=0)
        val = Preprocessed(val, pre)
        srm_passes = passes(METHODS["SRM paper"], final, extra)
        for pair, spec in STUDENTS.items():
            for name, method in METHODS.items():
                # seed 0 with each setting, scored on validation; the best one's seed-0 run is kept
                tried = [run(teacher, spec, method, s, train, {"val": val, "test": test}, budget.seeds[0], budget,
                             size, args.work_dir) for s in GRID[name]]
                best = max(range(len(tried)), key=lambda i: tried[i]["val"])
                setting = GRID[name][best]
                results = [tried[best]] + [run(teacher, spec, method, setting, train, {"test": test}, seed, budget,
                                               size, args.work_dir) for seed in budget.seeds[1:]]
                equal, own = None, passes(method, final, extra)
                if own < srm_passes:
                    longer = final + srm_passes - own
                    equal = [run(teacher, spec, method, setting, train, {"test": test}, seed, budget, size,
                                 args.work_dir, final_epochs=longer)["test"] for seed in budget.equal_compute_seeds]
                rows.append({"size": size, "pair": pair, "method": name, "setting": setting,
                             "validation": [t["val"] for t in tried], "test": [r["test"] for r in results],
                             "seconds": [r["seconds"] for r in results], "passes": own,
                             "equal_compute_test": equal})
                print(json.dumps(rows[-1]), flush=True)
        if size == budget.ablation_size:
            pair, spec = next(iter(STUDENTS.items()))
            chosen = next(r["setting"] for r in rows if r["size"] == size and r["pair"] == pair
                          and r["method"] == "SRM paper")
            for variant, change in ABLATION.items():
                tests = [run(teacher, spec, METHODS["SRM paper"], {**chosen, **change}, train, {"test": test}, seed,
                             budget, size, args.work_dir)["test"] for seed in budget.ablation_seeds]
                ablation.append({"size": size, "pair": pair, "variant": variant, "change": change, "test": tests})
                print(json.dumps(ablation[-1]), flush=True)
    write_results(args, budget, rows, ablation, teacher_test, time.time() - started, code)
    return rows, ablation


if __name__ == "__main__":
    main()
