"""Distil an image classifier into a smaller one with Sparse Representation Matching (or another `--method`).

    python recipes/distill.py                                  # offline default: Fashion-MNIST, teacher trained first
    python recipes/distill.py --config recipes/configs/cifar10.yaml
    accelerate launch recipes/distill.py --config recipes/configs/beans.yaml --max_steps 5
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/distill.py --config ...
    python recipes/distill.py --config ... --push_to_hub --hub_model_id you/student-srm

Flags override the YAML file; an unknown YAML key is an error. The teacher is the shipped Fashion-MNIST one unless
--teacher_model_name_or_path names another or --train_teacher trains one first. Prints the test accuracy of the
teacher, the distilled student and the same student trained by each `--compare` method (KD and alone by default)
from the same initial weights for the same measured compute (per-step times of every stage, measured before
training on the same batch; `recipes/compute.py`), and writes to output_dir: the student (its library's format)
with method_state.safetensors, README.md (model card), srm_report.png, results.json, test_results.json
(`Trainer.save_metrics`) and TensorBoard logs.
"""

import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

from offline import go_offline_if_hub_unreachable

go_offline_if_hub_unreachable()  # before the Hugging Face libraries are imported

import torch
from compute import run_cost, steps_for_cost
from distill_checks import check_before_loading, check_engine, compared, only_stage
from distill_resume import compared_checkpoint, ends_plan, load_trained, planned, step_seconds
from train_teacher import FASHION_MNIST_INPUT, TeacherArguments, data_signature, train_teacher
from transformers import EvalPrediction, set_seed

from srm_hf import DistillationConfig, DistillationTrainer
from srm_hf.argparser import SRMParser, parse_kwargs
from srm_hf.data import DataArguments, ImageSplits, load_image_splits
from srm_hf.forward import on_device
from srm_hf.hub import push_dictionary
from srm_hf.loading import label_names_of, load_image_classifier, load_image_processor, same_label
from srm_hf.methods.srm import DICTIONARY_NAME
from srm_hf.plots import atom_usage, save_report
from srm_hf.preflight import check_output_dir, check_split_images
from srm_hf.resume import data_settings, schedule_settings
from srm_hf.taps import format_tap_plan
from srm_hf.transforms import AugmentedDataset, ImageTransform, image_processor_for, preprocessing_for

# A ResNet-18 (widths 16-128) trained on Fashion-MNIST by recipes/teachers/README.md's command; run from the repo root.
SHIPPED_TEACHER = "recipes/teachers/fashion_mnist_resnet18"
DEFAULT_STUDENT_KWARGS = {"in_chans": 1, "channels": [8, 16, 32, 64], "stem_width": 8,
                          "pretrained_cfg_overlay": FASHION_MNIST_INPUT}
# The offline default run; a YAML config and flags override any of these. Ten images per class trained long: where
# distillation pays for the teacher's forward at equal measured compute. SRM's stages and its pixel CE on logits (the
# reference feeds it sigmoid outputs): the best SRM variant on validation (recipes/benchmarks/results/srm_search_10*.md).
RECIPE_DEFAULTS = dict(
    output_dir="outputs/fashion_mnist_srm", max_train_samples_per_class=10, per_device_train_batch_size=32,
    per_device_eval_batch_size=512, learning_rate=3e-3, max_steps=2200, logging_steps=100, eval_strategy="steps",
    eval_steps=550, save_strategy="no", report_to="tensorboard", seed=42,
)
SRM_RECIPE_DEFAULTS = dict(srm_dictionary_max_steps=300, srm_max_steps=200, srm_pixel_ce_on_sigmoid=False)  # srm only
EPOCHS_OF = {"max_steps": "num_train_epochs", "srm_dictionary_max_steps": "srm_dictionary_epochs",
             "srm_max_steps": "srm_epochs"}  # a step count above is left out where its epochs are given


@dataclass
class ModelArguments:
    student_model_name_or_path: str = field(
        default="timm:resnet10t", metadata={"help": "Student: 'timm:<arch>', a Hub id or a local folder."}
    )
    student_model_kwargs: str = field(
        default=json.dumps(DEFAULT_STUDENT_KWARGS), metadata={"help": "JSON keyword arguments for the student."}
    )
    student_pretrained: bool = field(default=False, metadata={"help": "Start the student from pretrained weights."})
    teacher_model_kwargs: str = field(default="{}", metadata={"help": "JSON keyword arguments to load the teacher."})
    teacher_revision: str | None = field(default=None, metadata={"help": "Teacher revision on the Hub (model card)."})


@dataclass
class ScriptArguments:
    metrics: list[str] = field(default_factory=lambda: ["accuracy"], metadata={"help": "evaluate metric names."})
    compare: list[str] | None = field(
        default=None,
        metadata={"help": "One-stage methods also trained on the same student (same initial weights), each for the "
                          "main run's measured compute; 'none' for none. Default: kd and alone, less the main run's "
                          "method."},
    )
    report: bool = field(default=True, metadata={"help": "Write srm_report.png (loss curves, atom usage)."})
    push_dictionary_to_hub: str | None = field(default=None, metadata={"help": "Repo id for the dictionary."})


def get_teacher(config, model_args, teacher_args, data_args, splits: ImageSplits):
    """The given teacher (by default the shipped Fashion-MNIST one), or with --train_teacher one trained here (cached
    in output_dir/teacher while its recipe is unchanged). A given teacher must predict the data's labels: it is never
    re-headed silently."""
    name = config.teacher_model_name_or_path
    if teacher_args.train_teacher and name is not None:
        raise ValueError("Give one teacher source: --teacher_model_name_or_path (a trained teacher) or --train_teacher "
                         "true (train one here first), not both.")
    if name is None and not teacher_args.train_teacher:
        name = SHIPPED_TEACHER
    if teacher_args.train_teacher:
        name = os.path.join(config.output_dir, "teacher")
        recipe = os.path.join(name, "teacher_recipe.json")
        # the cache serves this run only if the same recipe trained it on the same data and labels
        wanted = {"teacher_args": dataclasses.asdict(teacher_args), "data": data_signature(data_args),
                  "label_names": splits.label_names, "train_fingerprint": splits.fingerprint}  # contents too
        cached = {}
        if os.path.isfile(recipe):
            with open(recipe) as f:
                cached = {k: v for k, v in json.load(f).items() if k in wanted}
            if isinstance(cached.get("data"), dict):  # keys an earlier version recorded and this one ignores
                cached["data"] = {k: v for k, v in cached["data"].items() if k in wanted["data"]}
        if cached != wanted:
            if cached:
                print(f"Retraining the cached teacher in {name}: its {changed_keys(cached, wanted)} differ from "
                      "this run's.")
            train_teacher(teacher_args, data_args, config, name)
    kwargs = parse_kwargs(model_args.teacher_model_kwargs, "teacher_model_kwargs")
    if model_args.teacher_revision:
        kwargs["revision"] = model_args.teacher_revision
    teacher = load_image_classifier(name, **kwargs)
    labels = getattr(teacher, "num_classes", None) or getattr(getattr(teacher, "config", None), "num_labels", None)
    if labels != len(splits.label_names):
        raise ValueError(f"The teacher {name!r} predicts {labels} labels, the data has {len(splits.label_names)} "
                         f"({splits.source}). Pass a teacher trained on this data, or --train_teacher true.")
    names = label_names_of(teacher)
    if names is None:
        print(f"The teacher {name!r} records no label names: its outputs are taken in the data's label order "
              f"({splits.source}), which cannot be checked.")
    elif [same_label(n) for n in names] != [same_label(n) for n in splits.label_names]:
        raise ValueError(f"The teacher {name!r} was trained on the labels {names}, in that order; the data's are "
                         f"{splits.label_names} ({splits.source}). Pass a teacher trained on this data (or relabel the "
                         "data to the teacher's order), or --train_teacher true.")
    return name, teacher


@torch.no_grad()
def evaluate_teacher(trainer: DistillationTrainer, dataset, compute_metrics, prefix: str) -> dict:
    """The teacher's metrics through the distillation trainer's own loader and processes (no second Trainer, which
    DeepSpeed would refuse)."""
    logits, labels = [], []
    for batch in trainer.get_eval_dataloader(dataset):
        batch = on_device(batch, trainer.args.device)
        out = trainer.teacher_forward(batch).logits
        logits.append(trainer.accelerator.gather_for_metrics(out.float()).cpu())
        labels.append(trainer.accelerator.gather_for_metrics(batch["labels"]).cpu())
    metrics = compute_metrics(EvalPrediction(predictions=torch.cat(logits).numpy(), label_ids=torch.cat(labels).numpy()))
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def changed_keys(cached: dict, wanted: dict) -> list[str]:
    """The keys whose values differ, one level into mappings ('data.validation_fraction')."""
    changed = []
    for key, value in wanted.items():
        old = cached.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            changed += [f"{key}.{k}" for k in sorted(set(value) | set(old)) if value.get(k) != old.get(k)]
        elif old != value:
            changed.append(key)
    return changed


def parse_arguments(argv: list[str] | None = None) -> tuple:
    """The recipe's arguments: flags over a YAML `--config` over RECIPE_DEFAULTS, and for SRM over its recipe settings
    too (another --method starts from the library's defaults of its own). A step count of those defaults gives way
    to the matching epochs where the config or a flag sets them."""
    def parser():
        return SRMParser((ScriptArguments, DataArguments, ModelArguments, TeacherArguments, DistillationConfig))

    probe = parser()  # what the config and the flags give: the method, and the options set
    probe.set_defaults(**RECIPE_DEFAULTS)
    method = probe.parse(argv)[-1].method
    if ignored := sorted({"do_train", "do_eval", "do_predict"} & probe.given):
        raise ValueError(f"{', '.join(ignored)}: the recipe always trains, evaluates on the validation split and tests "
                         "on --test_split, so these would change nothing. Remove them (--test_split none skips the "
                         "test; --eval_strategy no, the evaluations during training).")
    defaults = {**RECIPE_DEFAULTS, **(SRM_RECIPE_DEFAULTS if method == "srm" else {})}
    argv = list(sys.argv[1:] if argv is None else argv)
    for steps, epochs in EPOCHS_OF.items():  # `num_train_epochs: 20` in a config must not lose to max_steps=2200,
        if epochs in probe.given:  # nor an epochs flag to the step count of the config under it
            defaults.pop(steps, None)
            argv += ["--" + steps, "-1"] if epochs in probe.flags and steps not in probe.flags else []
    final = parser()
    final.set_defaults(**defaults)  # under the YAML config and the flags
    script_args, *others, config = final.parse(argv)
    if script_args.compare is None:
        script_args.compare = [m for m in ("kd", "alone") if m != config.method]
    return (script_args, *others, config)


def main(argv: list[str] | None = None) -> dict:
    script_args, data_args, model_args, teacher_args, config = parse_arguments(argv)
    check_engine(config, script_args)
    compute_metrics, resume = check_before_loading(script_args, model_args, config)
    set_seed(config.seed)
    check_output_dir(config.output_dir, 0)  # writable; the trainer checks the room once the models are known

    splits = load_image_splits(data_args)
    if data_args.check_images:
        check_split_images(splits)
    teacher_name, teacher = get_teacher(config, model_args, teacher_args, data_args, splits)
    set_seed(config.seed)  # the student's initial weights: the same whether the teacher was trained here or cached,
    # so a resumed run's compared runs that start afresh start from the main run's initial weights
    student = load_image_classifier(model_args.student_model_name_or_path, num_labels=len(splits.label_names),
                                    id2label=splits.id2label, pretrained=model_args.student_pretrained,
                                    **parse_kwargs(model_args.student_model_kwargs, "student_model_kwargs"))
    # the comparison runs start from these same weights: a paired comparison, not several random inits
    initial = copy.deepcopy(student) if compared(script_args) else None
    processor = load_image_processor(model_args.student_model_name_or_path)
    student_pre = preprocessing_for(student, processor)
    # saved with a transformers student, so that pipeline("image-classification") can feed it
    processor = processor or image_processor_for(student, student_pre)
    teacher_pre = preprocessing_for(teacher, load_image_processor(teacher_name))

    # random views keyed by (seed, epoch, image): a resumed run trains on the views an uninterrupted one sees
    train = AugmentedDataset(splits.train, ImageTransform(student_pre, teacher_pre, train=True), seed=config.seed)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                                  processing_class=processor,
                                  eval_dataset=splits.validation.with_transform(ImageTransform(student_pre, teacher_pre)),
                                  compute_metrics=compute_metrics)
    if trainer.tap_pairs:
        taps = format_tap_plan(trainer.tap_pairs)
        print(f"Tap pairs (teacher -> student; set layer_pairs to choose others):\n{taps}")
    # a checkpoint at the end of this run's plan (killed in a compared run, or before the results were written)
    # holds the trained student; one that cannot be resumed is refused before the timing and any training
    plan = planned(trainer) if resume is not None or compared(script_args) else None
    main_done = resume is not None and ends_plan(resume, plan.describe(), schedule_settings(config),
                                              data_settings(config))
    seconds, series_ns = step_seconds(trainer, initial, teacher, config, compared(script_args), train,
                                      resume is not None)
    runs, cost = [], 0.0  # the compared runs: each one's name, steps and checkpoint to go on from
    if compared(script_args):
        cost = run_cost(plan, seconds, config.method)
        for name in compared(script_args):
            steps = steps_for_cost(cost, seconds[(name, only_stage(name))])
            checkpoint = compared_checkpoint(config.output_dir, name, steps, series_ns) if resume is not None else None
            runs.append((name, steps, checkpoint))
    if main_done:
        load_trained(trainer, resume)
    else:
        trainer.train(resume_from_checkpoint=resume)
    test = splits.test if splits.test is not None else splits.validation
    if splits.test is None:
        print(f"{splits.source} has no test split: the final evaluation uses the validation split.")
    # saved before anything else can fail; with --push_to_hub it is published once, at the end, with its card
    trainer.save_model(_internal_call=True)
    results = {"student": trainer.evaluate(test.with_transform(ImageTransform(student_pre)), metric_key_prefix="test")}
    results["teacher"] = evaluate_teacher(trainer, test.with_transform(ImageTransform(teacher_pre)),
                                        compute_metrics, "test")
    usage = atom_usage(trainer, splits.validation.with_transform(ImageTransform(student_pre, teacher_pre)))
    if script_args.report and trainer.is_world_process_zero():
        save_report(os.path.join(config.output_dir, "srm_report.png"), trainer.state.log_history, usage,
                    title=f"{config.method} on {splits.source}")

    compute = {}
    if compared(script_args):
        compute = {"seconds_per_step": {f"{m}/{s}": v for (m, s), v in seconds.items()}, "main_run_seconds": cost,
                   "steps": {name: steps for name, steps, _ in runs}}
    for name, run in train_compared(config, runs, initial, teacher, train, compute_metrics):
        results[f"{name}_student"] = run.evaluate(test.with_transform(ImageTransform(student_pre)),
                                                 metric_key_prefix="test")

    metrics = {f"{who}_{k.removeprefix('test_')}": v for who, m in results.items() for k, v in m.items()
               if k.startswith("test_") and k.removeprefix("test_") in script_args.metrics}
    card = dict(dataset=data_args.dataset_dir or data_args.dataset_name, teacher=teacher_name,
                teacher_revision=model_args.teacher_revision, student=model_args.student_model_name_or_path,
                metrics={"test_" + k.removeprefix("student_"): v for k, v in metrics.items()})
    trainer.create_model_card(**card)
    trainer.save_metrics("test", metrics)  # test_results.json and all_results.json, as the Trainer's examples write
    if trainer.is_world_process_zero():
        with open(os.path.join(config.output_dir, "results.json"), "w") as f:
            json.dump({"data": splits.source, "evaluated_on": "test" if splits.test is not None else "validation",
                       "train_images": len(splits.train), "test_images": len(test),
                       "plan": str(trainer.plan), "metrics": metrics, "equal_compute": compute}, f, indent=2)
        print(f"\n{config.method} on {splits.source}: {len(splits.train)} training images, {len(test)} test images")
        for key, value in metrics.items():
            print(f"  {key:32s} {value:.4f}")
    if config.push_to_hub:
        trainer.push_to_hub(**card)  # one commit: the student and the card above
    if script_args.push_dictionary_to_hub:
        path = os.path.join(config.output_dir, DICTIONARY_NAME)
        if trainer.is_world_process_zero():
            push_dictionary(trainer.method.save_dictionary(path), script_args.push_dictionary_to_hub)
    return metrics


def compared_args(config, name: str, steps: int):
    """The compared run's settings: the main run's for its own method, `steps` long, in output_dir/<name>."""
    return config.for_method(name, output_dir=os.path.join(config.output_dir, name), max_steps=steps,
                             eval_strategy="no", report_to="none",
                             push_to_hub=False)  # the Hub gets the main student


def train_compared(config, runs: list, initial, teacher, train, compute_metrics):
    """Yields (name, trainer) for each compared run (name, steps, checkpoint to go on from), trained from the main
    run's initial weights, or loaded where its checkpoint ends its plan."""
    for name, steps, checkpoint in runs:
        args = compared_args(config, name, steps)  # (new TrainingArguments reset accelerate's state: built here,
        done = checkpoint is not None and ends_plan(  # just before the trainer that sets it up again)
            checkpoint, [[only_stage(name), steps]], schedule_settings(args), data_settings(args))
        run = DistillationTrainer(model=copy.deepcopy(initial), teacher_model=teacher, train_dataset=train, args=args,
                                  compute_metrics=compute_metrics)
        if done:
            load_trained(run, checkpoint)
        else:
            run.train(resume_from_checkpoint=checkpoint)
        yield name, run


if __name__ == "__main__":
    main()
