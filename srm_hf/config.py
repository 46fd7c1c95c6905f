"""`DistillationConfig`: the distillation settings on top of `transformers.TrainingArguments`.

`num_train_epochs` / `max_steps` size each method's last stage (KD in SRM's `paper` mode, the joint stage in
`joint` mode, ...); the stages before it have their own `*_epochs` / `*_max_steps`. A method's own fields carry its
name as prefix (`srm_`, `kd_`, `dkd_`, `fitnet_`, `at_`, `reviewkd_`); setting a field of a method that is not
used is an error. The SRM maths and its reference settings: `srm_hf/srm.py` and `srm_hf/methods/srm.py`.
"""

import math
import os
import typing
from dataclasses import dataclass, field, fields, replace

from transformers import TrainingArguments

from .argparser import allows_none
from .fused import KERNEL_CHOICES, triton_available
from .methods import METHOD_PREFIXES, check_method_fields, method_class
from .stage_batches import parse_stage_batch_sizes
from .stages import check_schedule
from .trainer_options import check_reference_overrides, check_trainer_options


# An optional boolean's flag given alone means true (`--bf16`), as TrainingArguments' own booleans do; HfArgumentParser
# passes a field's metadata on to argparse, and gives a `bool | None` field no such default itself.
BARE_FLAG = {"nargs": "?", "const": True}


@dataclass
class DistillationConfig(TrainingArguments):
    """Distillation settings: the method, the taps, and each method's own fields."""

    method: str = field(
        default="srm",
        metadata={"help": "Distillation method: 'srm', or 'kd', 'dkd', 'fitnet', 'at', 'reviewkd', 'alone'."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher by Hub id, 'timm/<name>' or local path, when no `teacher_model` is passed."},
    )
    # ---- taps (methods that match intermediate features: srm, fitnet, at, reviewkd) ----
    layer_pairs: list[str] | None = field(
        default=None,
        metadata={"help": "Explicit taps as 'teacher.module:student.module'; default pairs layers by spatial size."},
    )
    tap_min_reduction: float = field(
        default=4.0,
        metadata={"help": "Automatic pairing skips feature maps finer than this (input height / map height)."},
    )
    allow_resize: bool = field(
        default=False,
        metadata={"help": "Let explicit pairs differ in grid size: the student's prediction map is resized."},
    )
    # ---- SRM ----
    srm_mode: str = field(default="paper", metadata={"help": "SRM stages: 'paper' (dictionary, SRM, KD) or 'joint'."})
    srm_codeword_multiplier: float = field(default=2.0, metadata={"help": "m: atoms per tap K = int(m * C)."})
    srm_sparsity_multiplier: float = field(default=0.02,
                                           metadata={"help": "s: kept atoms per pixel k = max(1, int(m*s*C))."})
    srm_targets: str = field(default="both", metadata={"help": "Teacher labels to match: 'pixel', 'image' or 'both'."})
    srm_pixel_weight: float = field(default=1.0, metadata={"help": "Weight of the pixel-level cross-entropy."})
    srm_image_weight: float = field(default=1.0, metadata={"help": "Weight of the image-level binary cross-entropy."})
    srm_pixel_ce_on_sigmoid: bool = field(
        default=True,
        metadata={"help": "Reference behaviour: the pixel CE is fed sigmoid outputs; False feeds raw logits."},
    )
    srm_weight: float = field(default=1.0, metadata={"help": "λ: weight of the SRM loss in the joint stage."})
    srm_kernels: str = field(
        default="auto",
        metadata={"help": "SRM targets, codes and loss: 'eager' (PyTorch), 'auto' (fused Triton kernels on CUDA, "
                          "eager elsewhere) or 'triton'.", "choices": list(KERNEL_CHOICES)},
    )
    srm_kernel_projections: bool = field(
        default=False,
        metadata={"help": "With the Triton kernels, also make the SRM projections inside them (the teacher's codes, "
                          "the heads' logits, stage 1's encode and decode) instead of by torch's convolutions and "
                          "matmuls. Off by default: slower on an H200 (results/cost.md)."},
    )
    srm_dictionary_epochs: float = field(default=1.0, metadata={"help": "Epochs of stage 1 (dictionary learning)."})
    srm_dictionary_max_steps: int = field(default=-1, metadata={"help": "Steps of stage 1; overrides its epochs."})
    srm_dictionary_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the dictionaries."})
    srm_dictionary_path: str | None = field(
        default=None,
        metadata={"help": "A saved dictionary (srm_dictionary.safetensors) to reuse: stage 1 is skipped."},
    )
    srm_epochs: float = field(default=1.0, metadata={"help": "Epochs of stage 2 (SRM initialisation, paper mode)."})
    srm_max_steps: int = field(default=-1, metadata={"help": "Steps of stage 2; overrides its epochs if > 0."})
    # ---- KD (also the last stage of srm, fitnet and at) ----
    kd_alpha: float = field(default=0.5, metadata={"help": "α: weight of the KD term; 1-α weighs the label CE."})
    kd_temperature: float = field(default=4.0, metadata={"help": "T: softmax temperature of the KD term."})
    # ---- DKD ----
    dkd_alpha: float = field(default=1.0, metadata={"help": "α: weight of the target-class term (TCKD)."})
    dkd_beta: float = field(default=8.0, metadata={"help": "β: weight of the non-target-class term (NCKD)."})
    dkd_temperature: float = field(default=4.0, metadata={"help": "T: softmax temperature of both DKD terms."})
    dkd_ce_weight: float = field(default=1.0, metadata={"help": "Weight of the label cross-entropy."})
    dkd_warmup_ratio: float = field(
        default=20 / 240, metadata={"help": "Share of the stage over which the DKD weight rises linearly from 0 to 1."}
    )
    # ---- FitNet ----
    fitnet_epochs: float = field(default=1.0, metadata={"help": "Epochs of the FitNet hint stage."})
    fitnet_max_steps: int = field(default=-1, metadata={"help": "Steps of the FitNet hint stage; overrides epochs."})
    # ---- AT ----
    at_beta: float = field(default=1000.0, metadata={
        "help": "β of attention transfer, on the sum over taps of each tap's mean (the authors' 1000)."})
    # ---- ReviewKD ----
    reviewkd_weight: float = field(default=5.0, metadata={"help": "Weight of the hierarchical context loss."})
    reviewkd_ce_weight: float = field(default=1.0, metadata={"help": "Weight of the label cross-entropy."})
    reviewkd_warmup_ratio: float = field(
        default=20 / 240, metadata={"help": "Share of the stage over which the review weight rises from 0 to 1."}
    )
    reviewkd_mid_channels: int | None = field(
        default=None, metadata={"help": "Channels inside the fusion modules; default min(512, deepest student tap's)."}
    )
    # ---- procedure ----
    preset: str = field(
        default="trainer",
        metadata={"help": "'trainer': the Trainer's optimizer, schedule and clipping in every stage; 'reference': the "
                          "SRM authors' procedure (coupled-L2 Adam, step decay in every stage, no clipping, per-stage "
                          "model selection on the eval split; srm_hf/reference.py)."},
    )
    stage_batch_sizes: str | None = field(
        default=None,
        metadata={"help": "A batch size per stage, per device, e.g. '{\"dictionary\": 512, \"srm\": 384}' (the "
                          "SRM reference's): other stages use per_device_train_batch_size (srm_hf/stage_batches.py)."},
    )
    # ---- precision and device: None follows the `accelerate launch` config (else False); a value given is kept ----
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: the launch config's.", **BARE_FLAG})
    fp16: bool | None = field(default=None, metadata={
        "help": "fp16 mixed precision; default: the launch config's.", **BARE_FLAG})
    use_cpu: bool | None = field(default=None, metadata={
        "help": "Train on the CPU; default: the launch config's.", **BARE_FLAG})
    # ---- engineering ----
    compile_student: bool = field(
        default=False,
        metadata={"help": "torch.compile the student's forward (after its taps are hooked); uses torch_compile_backend."},
    )
    compile_teacher: bool = field(
        default=False,
        metadata={"help": "torch.compile the teacher's forward like compile_student ('reduce-overhead': CUDA graphs)."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Student, teacher and images in channels_last memory format (NHWC, as timm's "
                          "--channels-last): convolutions under bf16/fp16 on NVIDIA GPUs run without layout "
                          "conversions. Same results; on the CPU 3-9 % faster steps (results/cost.md)."},
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={"help": "Consecutive optimizer steps with a NaN/inf gradient that are skipped before training stops."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: image datasets are transformed on the fly from columns the model never sees."},
    )

    def __post_init__(self):
        for name in NEEDS_VALUE:  # e.g. srm_max_steps=None or max_grad_norm=None, meant as "unset": a TypeError deep
            if getattr(self, name) is None:  # inside the Trainer or the optimizer, after earlier stages had trained
                default = DistillationConfig.__dataclass_fields__[name].default
                raise ValueError(f"{name}=None: {name} needs a value (its default is {default!r}).")
        # Method modules are unused in some stages, so DDP must look for unused parameters.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        # Under `accelerate launch`, the launch config's CPU choice and mixed precision fill the flags left unset
        # (the Trainer would otherwise put batches on a GPU that the config keeps the model off, and DeepSpeed
        # refuses a Trainer whose bf16/fp16 flags disagree with its own config). A value the user gave is kept.
        if self.use_cpu is None:
            self.use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if self.bf16 is None:
            self.bf16 = launched == "bf16" and not self.fp16
        if self.fp16 is None:
            self.fp16 = launched == "fp16" and not self.bf16
        dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
        if dynamo.lower() != "no":
            raise ValueError(f"The launch config's dynamo_backend={dynamo} would compile the whole distillation "
                             "module: launch with --dynamo_backend no (or set it in `accelerate config`) and use "
                             f"--compile_student / --compile_teacher with --torch_compile_backend {dynamo.lower()}.")
        if self.preset == "reference":
            self._apply_reference_preset()
        asked_torch_compile = self.torch_compile  # before TrainingArguments infers it from the backend / mode
        super().__post_init__()
        # Compile switches per model: compile_student / compile_teacher use torch_compile_backend / torch_compile_mode
        # (which make TrainingArguments turn torch_compile on, for a second compilation of the whole module).
        if self.compile_student or self.compile_teacher:
            if asked_torch_compile and not self.compile_student:
                raise ValueError("torch_compile=True asks for the trained model compiled, but compile_teacher alone "
                                 "compiles the teacher: add compile_student=True, or drop torch_compile.")
            self.torch_compile = False
        elif self.torch_compile:
            raise ValueError("torch_compile (also implied by torch_compile_backend / torch_compile_mode) would compile "
                             "the whole distillation module: set compile_student=True and/or compile_teacher=True "
                             "instead, with the same backend and mode.")
        self._check()

    def _apply_reference_preset(self):
        """What `preset="reference"` sets (srm_hf/reference.py); settings it would override are refused."""
        if self.warmup_steps or self.lr_scheduler_type != "linear":
            raise ValueError("preset='reference' has its own schedule (step decay x0.1 twice per stage, no warm-up): "
                             "leave lr_scheduler_type and warmup_steps unset, or use preset='trainer'.")
        check_reference_overrides(self)
        if self.eval_strategy in ("no", None):
            raise ValueError("preset='reference' selects each stage's best epoch on the eval split: set "
                             "eval_strategy='epoch' (or 'steps' with eval_steps) and pass an eval_dataset.")
        self.max_grad_norm = 0.0  # no clipping
        if self.weight_decay == 0.0:
            self.weight_decay = 1e-4  # the reference's coupled L2

    def _check(self):
        if self.preset not in ("trainer", "reference"):
            raise ValueError(f"preset={self.preset!r}: use 'trainer' or 'reference'.")
        check_method_fields(self, method_class(self.method))
        method_class(self.method).from_config(self)  # each method checks its own settings
        # the names are checked against the trainer's method (`DistillationTrainer`), which may be a custom one
        self.stage_batch_sizes = parse_stage_batch_sizes(self.stage_batch_sizes) or None
        check_trainer_options(self)
        check_schedule(self)
        if not self.srm_codeword_multiplier > 0:  # NaN fails too
            raise ValueError(f"srm_codeword_multiplier={self.srm_codeword_multiplier} must be > 0 (the paper: 1.5-4).")
        if not 0 < self.srm_sparsity_multiplier <= 1:  # NaN fails too
            raise ValueError(
                f"srm_sparsity_multiplier={self.srm_sparsity_multiplier} must be in (0, 1] (the paper uses 0.01-0.03)."
            )
        if self.srm_kernels not in KERNEL_CHOICES:
            raise ValueError(f"srm_kernels={self.srm_kernels!r} is not one of {KERNEL_CHOICES}.")
        if self.srm_kernels == "triton" and not triton_available():
            raise ValueError("srm_kernels='triton' needs the `triton` package (it comes with CUDA builds of torch): "
                             "install it, or set srm_kernels='auto'.")
        if self.srm_kernel_projections and self.srm_kernels == "eager":
            raise ValueError("srm_kernel_projections=True puts the projections inside the Triton kernels, which "
                             "srm_kernels='eager' turns off: set srm_kernels='auto', or drop srm_kernel_projections.")
        for name in ("kd_alpha", "dkd_warmup_ratio", "reviewkd_warmup_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")
        for name in ("kd_temperature", "dkd_temperature"):  # past 1000, T²·KL is float32 rounding noise
            if not 0 < getattr(self, name) <= 1000:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1000] (typical: 2 to 8).")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 0 (0: stop at the first one).")
        for name in ("srm_pixel_weight", "srm_image_weight", "srm_weight", "srm_dictionary_learning_rate", "at_beta",
                     "dkd_alpha", "dkd_beta", "dkd_ce_weight", "reviewkd_weight", "reviewkd_ce_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0.")
        for pair in self.layer_pairs or []:
            if pair.count(":") != 1 or not all(pair.split(":")):
                raise ValueError(
                    f"layer_pairs entry {pair!r} is not 'teacher.module:student.module' (one colon, two paths)."
                )

    def for_method(self, method: str, **changes) -> "DistillationConfig":
        """These run settings for another method: the other methods' own fields back to their defaults."""
        own = set(method_class(method).config_prefixes)
        reset = {f.name: f.default for f in fields(self) if f.init and f.name.split("_", 1)[0] in METHOD_PREFIXES
                 and f.name.split("_", 1)[0] not in own}
        other = replace(self, **{**reset, "method": method, "stage_batch_sizes": None, **changes})
        names = {s.name for s in method_class(method).from_config(other).stages()}  # sizes of the stages it shares
        sizes = {k: v for k, v in (self.stage_batch_sizes or {}).items() if k in names} or None
        return replace(self, **{**reset, "method": method, "stage_batch_sizes": sizes, **changes})

    @property
    def explicit_pairs(self) -> list[tuple[str, str]] | None:
        return [tuple(p.split(":")) for p in self.layer_pairs] if self.layer_pairs else None


_HINTS = typing.get_type_hints(DistillationConfig)
NEEDS_VALUE = sorted(f.name for f in fields(DistillationConfig) if not allows_none(_HINTS[f.name]) and (  # None breaks
    f.name not in TrainingArguments.__dataclass_fields__ or _HINTS[f.name] in (int, float)))  # them: ours, numbers
