"""Does SRM beat the other distillers at equal measured compute? Fashion-MNIST, 10 / 100 / 1,000 images per class.

    python recipes/benchmarks/quality.py            # full run: writes recipes/benchmarks/results/quality.{md,json,png}
    python recipes/benchmarks/quality.py --quick    # every method and pair for a few steps (the test suite runs this)

Teachers: the two shipped in recipes/teachers/ (ResNet-18, widths 24-192), one at 28 px (taps 7×7, 4×4, 2×2) and one
at 56 px (taps 14×14, 7×7, 4×4: grids of 8×8 and more, as in the SRM reference's CIFAR setting); the student is a
ResNet-10t (widths 8-64) at the teacher's input size. Every method uses the same trainer, taps, data and
augmentation; only the loss and the procedure differ.

Protocol:
- settings: in every cell each method tries the same number of settings (`GRID`) with seed 0, scored on a
  validation split (200 images/class carved from the training images, disjoint from every subset; the teachers
  never trained on it), never on the test split;
- own budget: the last stage runs `Budget.steps[size]` steps (25 % of that for the 56 px pair, whose steps cost
  about 3.5 times as much); each stage before it `EXTRA` (5 %) of that;
- equal compute by measured cost: before each cell, one optimizer step of every stage of every method is timed on
  the same batch in interleaved rounds (`recipes/compute.py`); every method's last stage is lengthened (or, for a
  method that costs more, shortened) until Σ steps × seconds per step equals SRM paper's;
- 3 seeds, accuracy on the 10,000 test images, mean ± std, and whether each difference exceeds the spread.

Every finished run is appended to `<out_dir>/quality_runs.jsonl` (and each cell's measured costs too), so an
interrupted benchmark continues where it stopped when started again with the same arguments.
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
from compute import first_batch, stage_step_seconds  # noqa: E402
from bench_report import commit  # noqa: E402
from quality_report import write_results  # noqa: E402
from run_cache import Missing, Runs  # noqa: E402
from transformers import set_seed  # noqa: E402

from srm_hf import DistillationConfig, DistillationTrainer  # noqa: E402
from srm_hf.data import DataArguments, load_image_splits, stratified_subset  # noqa: E402
from srm_hf.loading import load_image_classifier  # noqa: E402
from srm_hf.methods import method_class  # noqa: E402
from srm_hf.metrics import make_compute_metrics  # noqa: E402
from srm_hf.stages import stage_steps  # noqa: E402
from srm_hf.transforms import ImageTransform, preprocessing_for  # noqa: E402

TEACHERS = os.path.join(os.path.dirname(HERE), "teachers")
STUDENT_KWARGS = {"in_chans": 1, "channels": [8, 16, 32, 64], "stem_width": 8}


@dataclasses.dataclass(frozen=True)
class Pair:
    teacher: str  # a folder in recipes/teachers/
    size: int  # input size of teacher and student
    step_scale: float = 1.0  # share of the budget's steps (a 56 px step costs about 3.5 times a 28 px one)


PAIRS = {
    "ResNet-18 → ResNet-10t, 28 px": Pair("fashion_mnist_resnet18", 28),
    "ResNet-18 → ResNet-10t, 56 px (14×14 taps)": Pair("fashion_mnist_resnet18_56px", 56, step_scale=0.25),
}
# name -> DistillationConfig fields; `EXTRA` sizes the stages before the last one
METHODS = {
    "alone": {"method": "alone"},
    "KD": {"method": "kd"},
    "DKD": {"method": "dkd"},
    "FitNet": {"method": "fitnet"},
    "AT": {"method": "at"},
    "ReviewKD": {"method": "reviewkd"},
    "SRM paper": {"method": "srm", "srm_mode": "paper"},
    "SRM joint": {"method": "srm", "srm_mode": "joint"},
    "SRM reference": {"method": "srm", "srm_mode": "paper", "preset": "reference", "learning_rate": 1e-3},
}
# Share of the last stage's steps for each stage before it: 5 %, the best of 5 / 10 / 20 % for SRM paper at equal
# measured compute on validation (results/srm_search_100.md).
EXTRA = 0.05
# Two settings per method, chosen on validation: the student alone tunes its learning rate, DKD its β (mdistiller's
# CIFAR-100 range), ReviewKD its loss weight (the authors' range), SRM joint its λ, SRM paper its pixel CE, AT
# whether KD joins it (α 0: the AT of the paper's tables and of mdistiller; 0.9: the paper's AT+KD), the others KD's α.
GRID = {name: [{"kd_alpha": a} for a in (0.5, 0.9)] for name in METHODS} | {
    "alone": [{"learning_rate": lr} for lr in (3e-3, 1e-2)],
    "AT": [{"kd_alpha": a} for a in (0.0, 0.9)],
    "DKD": [{"dkd_beta": b} for b in (2.0, 8.0)],
    "ReviewKD": [{"reviewkd_weight": w} for w in (1.0, 5.0)],
    "SRM joint": [{"kd_alpha": 0.9, "srm_weight": w} for w in (0.1, 1.0)],
    # the reference's pixel CE on sigmoid outputs, or on logits (the best SRM variant on validation at 10 img/class)
    "SRM paper": [{"kd_alpha": 0.5, "srm_pixel_ce_on_sigmoid": b} for b in (True, False)],
}


@dataclasses.dataclass
class Budget:
    steps: dict[int, tuple[int, int]]  # images/class -> (steps of the last stage, batch size)
    seeds: tuple[int, ...]
    val_per_class: int
    test_samples: int | None  # None: the full test split
    timing_rounds: int


# Few images call for long training (distillation pays there: results/srm_search_10.md), many for larger batches.
FULL = Budget(steps={10: (2000, 32), 100: (1000, 64), 1000: (600, 128)}, seeds=(0, 1, 2), val_per_class=200,
              test_samples=None, timing_rounds=8)
QUICK = Budget(steps={4: (2, 8)}, seeds=(0,), val_per_class=2, test_samples=32, timing_rounds=1)


def student_model(size: int):
    overlay = {"input_size": [1, size, size], "test_input_size": [1, size, size], "mean": [0.286], "std": [0.353],
               "crop_pct": 1.0, "interpolation": "bilinear"}
    return load_image_classifier("timm:resnet10t", num_labels=10, pretrained=False, pretrained_cfg_overlay=overlay,
                                 **STUDENT_KWARGS)


def stage_fields(method: dict, last: int) -> dict:
    """Every stage length of a method whose last stage runs `last` steps."""
    extra = max(1, round(EXTRA * last))
    fields = {"max_steps": last}
    if method["method"] == "srm":
        fields["srm_dictionary_max_steps"] = extra
        if method.get("srm_mode", "paper") == "paper":
            fields["srm_max_steps"] = extra
    if method["method"] == "fitnet":
        fields["fitnet_max_steps"] = extra
    return fields


class Preprocessed(torch.utils.data.Dataset):
    """An eval split transformed once (the eval transform is deterministic), shared by every run."""

    def __init__(self, dataset, pre):
        batch = dataset.with_transform(ImageTransform(pre))[:]
        self.x, self.y = torch.stack(batch["pixel_values"]), torch.as_tensor(batch["labels"])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Cell:
    """One (pair, images/class) cell: its data, teacher and the trainer factory."""

    def __init__(self, pair: Pair, size: int, splits, budget: Budget, work_dir: str, evals: dict):
        self.pair, self.size, self.budget, self.work_dir = pair, size, budget, work_dir
        last, self.batch = budget.steps[size]
        self.last = max(1, round(last * pair.step_scale))
        self.teacher = load_image_classifier(os.path.join(TEACHERS, pair.teacher))
        pre = preprocessing_for(self.teacher)
        self.train = stratified_subset(splits.train, size, seed=0).with_transform(ImageTransform(pre, train=True))
        self.evals = evals

    def config(self, method: dict, setting: dict, seed: int, last: int) -> DistillationConfig:
        reference = method.get("preset") == "reference"
        # the reference preset picks each stage's best state on the selection split, twice per extra stage
        selection = {"eval_strategy": "steps", "eval_steps": max(1, round(EXTRA * last / 2))} if reference else {}
        return DistillationConfig(
            output_dir=self.work_dir, seed=seed, per_device_train_batch_size=self.batch,
            per_device_eval_batch_size=500, save_strategy="no", report_to="none", disable_tqdm=True,
            logging_steps=100, dataloader_num_workers=0,
            **{"learning_rate": 3e-3, **selection, **method, **setting, **stage_fields(method, last)})

    def trainer(self, method: dict, setting: dict, seed: int, last: int) -> DistillationTrainer:
        set_seed(seed)
        reference = method.get("preset") == "reference"
        return DistillationTrainer(model=student_model(self.pair.size), teacher_model=self.teacher,
                                   args=self.config(method, setting, seed, last), train_dataset=self.train,
                                   eval_dataset=self.evals["selection"] if reference else None,
                                   compute_metrics=make_compute_metrics())

    def run(self, method: dict, setting: dict, seed: int, last: int, splits=("test",)) -> dict:
        trainer = self.trainer(method, setting, seed, last)
        start = time.perf_counter()
        trainer.train()
        result = {"seconds": time.perf_counter() - start, "steps": [s.steps for s in trainer.plan.stages]}
        for name in splits:
            result[name] = trainer.evaluate(self.evals[name])["eval_accuracy"]
        return result

    def step_seconds(self, methods: dict[str, dict]) -> dict[str, dict[str, float]]:
        """Measured seconds per optimizer step of every stage of every method: {method: {stage: seconds}}."""
        probes = {name: self.trainer(method, settings[0], 0, 1) for name, (method, settings) in methods.items()}
        seconds = stage_step_seconds(probes, first_batch(next(iter(probes.values()))),
                                     rounds=self.budget.timing_rounds)
        out = {}
        for (name, stage), value in seconds.items():
            out.setdefault(name, {})[stage] = value
        return out

    def stages(self, method: dict, last: int) -> list:
        config = self.config(method, {}, 0, last)
        return method_class(config.method).from_config(config).stages()

    def cost(self, method: dict, seconds: dict[str, float], last: int) -> float:
        """Measured seconds of a whole run with a last stage of `last` steps."""
        return sum(stage_steps(s, None, last) * seconds[s.name] for s in self.stages(method, last))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Every method for a few steps: checks the pipeline only.")
    p.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    p.add_argument("--work_dir", default="outputs/benchmarks/quality")
    p.add_argument("--report_done", action="store_true",
                   help="Train nothing: write the report from the finished cells of the runs file.")
    args = p.parse_args(argv)
    budget = QUICK if args.quick else FULL
    started, code = time.time(), commit()  # the code that runs, before anything can change the checkout
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    runs = Runs(os.path.join(args.out_dir, f"quality{'_quick' if args.quick else ''}_runs.jsonl"), args.report_done)
    splits = load_image_splits(DataArguments(max_eval_samples=budget.test_samples))
    rows, teachers = [], {}
    for pair_name, pair in PAIRS.items():
        pre = preprocessing_for(student_model(pair.size))
        evals = {"test": Preprocessed(splits.test, pre),
                 "val": Preprocessed(stratified_subset(splits.validation, budget.val_per_class, seed=0), pre),
                 "selection": Preprocessed(stratified_subset(splits.validation, budget.val_per_class // 4 or 1,
                                                              seed=1), pre)}
        for size in budget.steps:
            try:
                rows += cell_rows(runs, budget, pair_name, pair, size, splits, args.work_dir, evals, teachers)
            except Missing as missing:
                print(f"{pair_name}, {size} images/class: not finished ({missing}), left out of the report")
    write_results(args, budget, EXTRA, rows, teachers, time.time() - started, code,
                  {name: pair.step_scale for name, pair in PAIRS.items()})
    return rows


def cell_rows(runs: Runs, budget: Budget, pair_name: str, pair: Pair, size: int, splits, work_dir: str, evals: dict,
              teachers: dict) -> list[dict]:
    """The rows of one cell: settings tried on validation, own-budget and equal-compute runs of every method."""
    rows = []
    cell = Cell(pair, size, splits, budget, work_dir, evals)
    teachers[pair_name] = runs.get(f"{pair_name}|teacher",
                                   lambda: teacher_accuracy(cell.teacher, evals["test"]))
    key = f"{pair_name}|{size}|{cell.last}x{cell.batch}"  # a changed budget never reuses a run
    # every setting of every method with seed 0 at its own budget, scored on validation
    tried = {name: [runs.get(f"{key}|{name}|{json.dumps(s)}|0|own",
                             lambda s=s, m=method: cell.run(m, s, 0, cell.last, ("val", "test")))
                    for s in GRID[name]] for name, method in METHODS.items()}
    chosen = {name: GRID[name][max(range(len(t)), key=lambda i: t[i]["val"])] for name, t in tried.items()}
    seconds = runs.get(f"{key}|seconds", lambda: cell.step_seconds(
        {n: (m, [chosen[n]]) for n, m in METHODS.items()}))
    srm_cost = cell.cost(METHODS["SRM paper"], seconds["SRM paper"], cell.last)
    for name, method in METHODS.items():
        setting = chosen[name]
        own_cost = cell.cost(method, seconds[name], cell.last)
        own = [runs.get(f"{key}|{name}|{json.dumps(setting)}|{seed}|own",
                        lambda seed=seed: cell.run(method, setting, seed, cell.last)) for seed in budget.seeds]
        last_stage = seconds[name][cell.stages(method, cell.last)[-1].name]
        extra = round((srm_cost - own_cost) / last_stage)  # steps that SRM paper's cost leaves (< 0: too many)
        equal, longer = None, (max(1, cell.last + extra) if extra != 0 else None)
        if longer is not None:
            equal = [runs.get(f"{key}|{name}|{json.dumps(setting)}|{seed}|equal",
                              lambda seed=seed: cell.run(method, setting, seed, longer))
                     for seed in budget.seeds]
        rows.append({"pair": pair_name, "size": size, "method": name, "setting": setting,
                     "validation": [t["val"] for t in tried[name]], "steps": own[0]["steps"],
                     "cost_seconds": own_cost, "srm_cost_seconds": srm_cost,
                     "seconds_per_step": seconds[name], "test": [r["test"] for r in own],
                     "seconds": [r["seconds"] for r in own], "equal_compute_steps": longer,
                     "equal_compute_test": None if equal is None else [r["test"] for r in equal]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def teacher_accuracy(teacher, test) -> float:
    teacher.eval()
    loader = torch.utils.data.DataLoader(test, batch_size=1000)
    correct = sum(int((teacher(b["pixel_values"]).argmax(-1) == b["labels"]).sum()) for b in loader)
    return correct / len(test)


if __name__ == "__main__":
    main()
