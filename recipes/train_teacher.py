"""Train or fine-tune a teacher with the plain `transformers.Trainer` and srm_hf's data code.

    python recipes/train_teacher.py                                   # Fashion-MNIST, a small ResNet from scratch
    python recipes/train_teacher.py --config recipes/configs/cifar10.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/train_teacher.py ...

`recipes/distill.py` calls `train_teacher()` itself when no teacher is given, and caches the result.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

from offline import go_offline_if_hub_unreachable

go_offline_if_hub_unreachable()  # before the Hugging Face libraries are imported

import torch
from transformers import Trainer, TrainingArguments

from srm_hf.argparser import SRMParser, parse_kwargs
from srm_hf.checkpoint import save_student
from srm_hf.data import DataArguments, load_image_splits
from srm_hf.metrics import make_compute_metrics
from srm_hf.preflight import check_last_batch, check_split_images
from srm_hf.loading import for_trainer, load_image_classifier, load_image_processor
from srm_hf.transforms import ImageTransform, preprocessing_for

FASHION_MNIST_INPUT = {"input_size": [1, 28, 28], "test_input_size": [1, 28, 28], "mean": [0.286], "std": [0.353],
                       "crop_pct": 1.0, "interpolation": "bilinear"}
DEFAULT_TEACHER_KWARGS = {"in_chans": 1, "channels": [16, 32, 64, 128], "stem_width": 16,
                          "pretrained_cfg_overlay": FASHION_MNIST_INPUT}


@dataclass
class TeacherArguments:
    train_teacher: bool = field(
        default=False,
        metadata={"help": "distill.py: train the teacher first (cached in output_dir/teacher) instead of loading "
                          "--teacher_model_name_or_path."},
    )
    teacher_architecture: str = field(
        default="timm:resnet18",
        metadata={"help": "Teacher to train: 'timm:<arch>', a Hub id or a local folder (fine-tuned if pretrained)."},
    )
    teacher_architecture_kwargs: str = field(
        default=json.dumps(DEFAULT_TEACHER_KWARGS), metadata={"help": "JSON keyword arguments for the model factory."}
    )
    teacher_pretrained: bool = field(default=False, metadata={"help": "Start from pretrained weights (needs the Hub)."})
    teacher_epochs: float = field(default=1.0, metadata={"help": "Epochs of teacher training on the full train split."})
    teacher_max_steps: int = field(default=-1, metadata={"help": "Steps of teacher training; overrides epochs if > 0."})
    teacher_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of teacher training."})


def teacher_training_args(base: TrainingArguments, teacher_args: TeacherArguments, output_dir: str) -> TrainingArguments:
    """The distillation run's batch sizes, precision and logging, with the teacher's own length and rate."""
    keep = ("per_device_train_batch_size", "per_device_eval_batch_size", "seed", "bf16", "fp16", "use_cpu",
            "report_to", "logging_steps", "dataloader_num_workers", "lr_scheduler_type", "warmup_steps",
            "weight_decay", "disable_tqdm", "gradient_accumulation_steps")
    values = {k: getattr(base, k) for k in keep}
    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=teacher_args.teacher_epochs, max_steps=teacher_args.teacher_max_steps,
        learning_rate=teacher_args.teacher_learning_rate, save_strategy="no", eval_strategy="no",
        remove_unused_columns=False, **values,
    )


def train_teacher(teacher_args: TeacherArguments, data_args: DataArguments, base: TrainingArguments, output_dir: str,
                  command: str | None = None):
    """Train a teacher on the full training split, save it (timm / transformers format) with its recipe, the command
    that ran it and its validation and test metrics (`teacher_recipe.json`), and return its folder."""
    full_data = dataclasses.replace(data_args, max_train_samples_per_class=None)
    splits = load_image_splits(full_data)
    if data_args.check_images:  # every image the teacher reads, before its first step
        check_split_images(splits)
    architecture_kwargs = parse_kwargs(teacher_args.teacher_architecture_kwargs, "teacher_architecture_kwargs")
    model = load_image_classifier(teacher_args.teacher_architecture, num_labels=len(splits.label_names),
                                  id2label=splits.id2label, pretrained=teacher_args.teacher_pretrained,
                                  **architecture_kwargs)
    if getattr(base, "channels_last", False):  # the distillation run's layout; convolutions take NCHW images to it
        model.to(memory_format=torch.channels_last)
    pre = preprocessing_for(model, load_image_processor(teacher_args.teacher_architecture))
    train = splits.train.with_transform(ImageTransform(pre, train=True))
    trainer = Trainer(
        model=for_trainer(model),
        args=teacher_training_args(base, teacher_args, output_dir),
        train_dataset=train,
        eval_dataset=splits.validation.with_transform(ImageTransform(pre)),
        compute_metrics=make_compute_metrics(),
    )
    args = trainer.args  # a last batch of one image, on which BatchNorm cannot train: refused before the first step
    check_last_batch(model, trainer.data_collator([train[0]])["pixel_values"].to(args.device), len(train),
                     args.per_device_train_batch_size, args.world_size, args.dataloader_drop_last)
    trainer.train()
    if trainer.args.should_save:  # before evaluating: an evaluation that fails leaves the trained weights
        save_student(model, output_dir)
    metrics = trainer.evaluate()
    if splits.test is not None:
        metrics |= trainer.evaluate(splits.test.with_transform(ImageTransform(pre)), metric_key_prefix="test")
    if trainer.args.should_save:  # the recipe last: what marks the folder a finished teacher
        with open(os.path.join(output_dir, "teacher_recipe.json"), "w") as f:
            json.dump({"teacher_args": dataclasses.asdict(teacher_args), "data": data_signature(data_args),
                       "label_names": splits.label_names, "train_fingerprint": splits.fingerprint,
                       "command": command, "metrics": metrics}, f, indent=2)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def data_signature(data_args: DataArguments) -> dict:
    """What identifies the teacher's training data: not the students' per-class cap, the test split (it only reports)
    or the Hub name beside a local `dataset_dir` (which is what is read)."""
    skip = {"max_train_samples_per_class", "max_eval_samples", "check_images", "test_split"}
    if data_args.dataset_dir:
        skip |= {"dataset_name", "dataset_config"}
    return {k: v for k, v in dataclasses.asdict(data_args).items() if k not in skip}


def main(argv: list[str] | None = None) -> str:
    parser = SRMParser((TeacherArguments, DataArguments, TrainingArguments))
    parser.set_defaults(output_dir="outputs/fashion_mnist_teacher", per_device_train_batch_size=128,
                        per_device_eval_batch_size=512, logging_steps=20, report_to="none")
    teacher_args, data_args, training_args = parser.parse(argv)
    command = " ".join(["python recipes/train_teacher.py", *(sys.argv[1:] if argv is None else argv)])
    return train_teacher(teacher_args, data_args, training_args, training_args.output_dir, command)


if __name__ == "__main__":
    print(main())
