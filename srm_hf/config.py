"""`DistillationConfig`: the method's settings on top of `transformers.TrainingArguments`.

`num_train_epochs` / `max_steps` size the final stage (KD in `paper` mode, the joint stage in `joint` mode);
the stages before it have their own `*_epochs` / `*_max_steps`. See `../SRM_METHOD.md` for the maths.
"""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

MODES = ("paper", "joint")
METHODS = ("srm", "kd", "fitnet", "at", "none")
TARGETS = ("both", "pixel", "image")


@dataclass
class DistillationConfig(TrainingArguments):
    """Sparse Representation Matching settings.

    Modes:
        paper: dictionary -> SRM initialisation of the student -> KD, as the reference implementation runs it.
        joint: dictionary -> one stage with loss = (1-α)·CE + α·KD + λ·SRM, so the teacher runs once per step.
    """

    method: str = field(
        default="srm",
        metadata={"help": "Distillation method: 'srm', or a baseline: 'kd', 'fitnet', 'at', 'none' (student alone)."},
    )
    mode: str = field(default="paper", metadata={"help": "SRM stages: 'paper' (dictionary, SRM, KD) or 'joint'."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher by Hub id, 'timm/<name>' or local path, when no `teacher_model` is passed."},
    )
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
    codeword_multiplier: float = field(default=2.0, metadata={"help": "m: atoms per tap K = int(m * C)."})
    sparsity_multiplier: float = field(default=0.02, metadata={"help": "s: kept atoms per pixel k = int(m * s * C)."})
    srm_targets: str = field(default="both", metadata={"help": "Teacher labels to match: 'pixel', 'image' or 'both'."})
    srm_pixel_weight: float = field(default=1.0, metadata={"help": "Weight of the pixel-level cross-entropy."})
    srm_image_weight: float = field(default=1.0, metadata={"help": "Weight of the image-level binary cross-entropy."})
    srm_pixel_ce_on_sigmoid: bool = field(
        default=True,
        metadata={"help": "Reference behaviour: the pixel CE is fed sigmoid outputs; False feeds raw logits."},
    )
    srm_weight: float = field(default=1.0, metadata={"help": "λ: weight of the SRM loss in the joint stage."})
    kd_alpha: float = field(default=0.5, metadata={"help": "α: weight of the KD term; 1-α weighs the label CE."})
    kd_temperature: float = field(default=4.0, metadata={"help": "T: softmax temperature of the KD term."})
    dictionary_epochs: float = field(default=1.0, metadata={"help": "Epochs of stage 1 (dictionary learning)."})
    dictionary_max_steps: int = field(default=-1, metadata={"help": "Steps of stage 1; overrides its epochs if > 0."})
    dictionary_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the dictionaries."})
    dictionary_path: str | None = field(
        default=None,
        metadata={"help": "A saved dictionary (srm_dictionary.safetensors) to reuse: stage 1 is skipped."},
    )
    srm_epochs: float = field(default=1.0, metadata={"help": "Epochs of stage 2 (SRM initialisation, paper mode)."})
    srm_max_steps: int = field(default=-1, metadata={"help": "Steps of stage 2; overrides its epochs if > 0."})
    compile_student: bool = field(
        default=False,
        metadata={"help": "torch.compile the student's forward (after its taps are hooked); uses torch_compile_backend."},
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={"help": "Consecutive optimizer steps with a NaN/inf gradient that are skipped before training stops."},
    )
    hint_epochs: float = field(default=1.0, metadata={"help": "Epochs of the FitNet hint stage."})
    hint_max_steps: int = field(default=-1, metadata={"help": "Steps of the FitNet hint stage; overrides epochs."})
    at_beta: float = field(default=1000.0, metadata={"help": "β of attention transfer (the AT paper's 1000)."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: image datasets are transformed on the fly from columns the model never sees."},
    )

    def __post_init__(self):
        # Dictionaries and heads are unused in some stages, so DDP must look for unused parameters.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        # Under `accelerate launch`, the launch config's CPU choice and mixed precision set the flags unless they
        # were set (the Trainer would otherwise put batches on a GPU that the config keeps the model off, and DeepSpeed
        # refuses a Trainer whose bf16/fp16 flags disagree with its own config).
        if os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
            self.use_cpu = True
        if not (self.bf16 or self.fp16):
            launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            self.bf16, self.fp16 = launched == "bf16", launched == "fp16"
        super().__post_init__()
        self._check()

    def _check(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}: use 'paper' (three stages) or 'joint'.")
        if self.srm_targets not in TARGETS:
            raise ValueError(f"srm_targets={self.srm_targets!r} is not one of {TARGETS}.")
        if self.codeword_multiplier <= 0:
            raise ValueError(f"codeword_multiplier={self.codeword_multiplier} must be > 0 (the paper uses 1.5 to 4).")
        if not 0 < self.sparsity_multiplier <= 1:
            raise ValueError(
                f"sparsity_multiplier={self.sparsity_multiplier} must be in (0, 1] (the paper uses 0.01 to 0.03)."
            )
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"kd_alpha={self.kd_alpha} must be in [0, 1]: it mixes KD (α) and label CE (1-α).")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature={self.kd_temperature} must be > 0 (typical: 2 to 8).")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 0 (0: stop at the first one).")
        for name in ("srm_pixel_weight", "srm_image_weight", "srm_weight", "dictionary_learning_rate", "at_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("dictionary", "srm", "hint"):
            epochs, steps = getattr(self, f"{name}_epochs"), getattr(self, f"{name}_max_steps")
            if steps <= 0 and epochs <= 0:
                raise ValueError(f"Stage '{name}' has no length: set {name}_epochs > 0 or {name}_max_steps > 0.")
        for pair in self.layer_pairs or []:
            if pair.count(":") != 1 or not all(pair.split(":")):
                raise ValueError(
                    f"layer_pairs entry {pair!r} is not 'teacher.module:student.module' (one colon, two paths)."
                )

    @property
    def stage_names(self) -> list[str]:
        """The stages `train()` runs, in order, before skipping a dictionary that is already learnt."""
        if self.method == "srm":
            return ["dictionary", "srm", "kd"] if self.mode == "paper" else ["dictionary", "joint"]
        return {"kd": ["kd"], "fitnet": ["hint", "kd"], "at": ["at"], "none": ["ce"]}[self.method]

    @property
    def explicit_pairs(self) -> list[tuple[str, str]] | None:
        return [tuple(p.split(":")) for p in self.layer_pairs] if self.layer_pairs else None
