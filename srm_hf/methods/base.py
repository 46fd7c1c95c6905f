"""The unit of srm_hf: a distillation `Method`, its stages and its loss.

A method is an `nn.Module` that owns the extra trainable modules it needs (dictionaries, heads, regressors) and
says, stage by stage, what is trained and how the loss is computed. `DistillationTrainer` runs any method without
knowing its name:

    class FeatureMSE(Method):
        name, uses_taps = "feature_mse", True

        def build(self, pairs):                       # called once the taps are paired: maps and pooled vectors
            super().build(pairs)
            self.proj = nn.ModuleDict({p.key: nn.Conv2d(p.student.channels, p.teacher.channels, 1) if p.teacher.spatial
                                       else nn.Linear(p.student.channels, p.teacher.channels) for p in pairs})

        def stages(self):
            return [StageSpec("mse", trains=("student", "proj"))]   # the last stage: num_train_epochs / max_steps

        def loss(self, stage, student, teacher, labels):
            return {"mse": sum(F.mse_loss(self.proj[k](student.features[k]), t) for k, t in teacher.features.items())}

    DistillationTrainer(model=student, teacher_model=teacher, method=FeatureMSE(), args=..., train_dataset=...)

`loss` runs inside the trained module's forward (so DDP sees every parameter it uses) and returns named terms: the
trainer sums them into the loss and logs each as `<stage>/<term>`. `prepare_teacher`, called in the same forward
before the student runs, may reduce the teacher's outputs first (SRM turns its maps into labels there).

Every trainable parameter of the method's child modules is trained by one of its stages (`StageSpec.trains`): a
module fixed by design is frozen by the method (`requires_grad_(False)`, as SRM freezes a loaded dictionary), and a
trainable one that no stage trains is refused when the trainer is built.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass(frozen=True)
class StageSpec:
    """One stage of a method, as the method declares it."""

    name: str
    trains: tuple[str, ...] = ("student",)  # "student" and/or names of the method's child modules
    epochs: float | None = None  # None: the last stage, sized by TrainingArguments' num_train_epochs / max_steps
    max_steps: int = -1  # > 0 overrides `epochs`
    uses_teacher: bool = True  # False: the teacher does not run (e.g. the student trained alone)
    runs_student: bool = True  # False: the student does not run (e.g. SRM's dictionary stage)
    constant_lr: bool = False  # True: a constant learning rate instead of the configured schedule

    def __post_init__(self):
        if isinstance(self.trains, str) or not self.trains or not all(isinstance(t, str) for t in self.trains):
            raise ValueError(f"StageSpec {self.name!r}: trains={self.trains!r} must be a non-empty tuple of names, "
                             "'student' and/or the method's child modules, e.g. trains=('student',).")
        if self.max_steps <= 0 and self.epochs is not None and not self.epochs > 0:  # max_steps > 0 overrides it
            raise ValueError(f"StageSpec {self.name!r}: epochs={self.epochs} must be > 0 (a stage always runs at "
                             "least one step): leave the stage out of `stages()` to skip it.")


@dataclass
class Features:
    """What a model's forward gives a method: logits and the tapped features keyed by pair key."""

    logits: torch.Tensor | None  # [N, num_labels]
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, C, H, W], [N, L, C] or [N, C]
    targets: dict = field(default_factory=dict)  # what `Method.prepare_teacher` derived from the features, by key


class Method(nn.Module):
    """Base class of every distillation method (see the module docstring).

    Class attributes:
        name: what `DistillationConfig(method=...)` calls it; also the checkpoint's record of the method.
        uses_taps: whether the method needs paired intermediate features (else no taps are planned or hooked).
        config_prefixes: prefixes of the `DistillationConfig` fields it reads (`"kd"` for `kd_alpha`, ...);
            fields of other methods' prefixes are refused when set.
        label_smoothing: ε of every cross-entropy with the class labels (`classification_loss(..., ε)`); the trainer
            sets it from `TrainingArguments.label_smoothing_factor`.
        citation: the BibTeX of the method's paper, cited by the student's model card ("" for none).
    """

    name: str = "method"
    uses_taps: bool = False
    config_prefixes: tuple[str, ...] = ()
    label_smoothing: float = 0.0  # for every CE with the class labels; the trainer sets `label_smoothing_factor`
    citation: str = ""

    def __init__(self):
        super().__init__()
        self.pairs: list = []
        self.teacher_fingerprint: str | None = None  # the teacher's weights, as the trainer names them before `build`
        self.built = False  # set once a `DistillationTrainer` is built around it: one instance serves one trainer

    @classmethod
    def from_config(cls, args) -> "Method":
        """The method with its settings read from a `DistillationConfig`."""
        return cls()

    def build(self, pairs: list) -> None:
        """Create the extra modules for these tap pairs (`srm_hf.taps.TapPair`); called once, before training."""
        self.pairs = list(pairs)

    def stages(self) -> list[StageSpec]:
        """The stages in order; the last one is sized by `num_train_epochs` / `max_steps`."""
        raise NotImplementedError(f"{type(self).__name__} must define stages().")

    def group_options(self, group: str) -> dict:
        """Optimizer options for the parameter group of a child module (e.g. its own learning rate)."""
        return {}

    def prepare_teacher(self, stage, teacher: Features) -> None:
        """Called with the teacher's outputs before the student runs: a method may reduce them in place to what
        `loss` needs (e.g. labels in `teacher.targets`, dropping `teacher.features`), so that the teacher's maps are
        freed before the student's activations are stored. Default: nothing."""

    def stage_finished(self, stage) -> None:
        """Called once `stage` (a `srm_hf.stages.Stage`) has run its last step; on resuming, for each stage the
        checkpoint had finished. Default: nothing."""

    def loss(self, stage, student: Features | None, teacher: Features | None,
             labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The named loss terms of one step. `stage` is the running `srm_hf.stages.Stage` (name, progress);
        `student` is None in stages that do not run it, `teacher` None in stages without the teacher."""
        raise NotImplementedError(f"{type(self).__name__} must define loss().")

    def describe(self) -> dict:
        """What a checkpoint records to recognise this method's configuration (name and settings)."""
        return {"name": self.name}


def check_stage_length(prefix: str, epochs: float, max_steps: int) -> None:
    """A stage before the last needs a length: `<prefix>_epochs` > 0 or `<prefix>_max_steps` > 0."""
    if max_steps <= 0 and not epochs > 0:
        raise ValueError(f"Stage '{prefix}' has no length: set {prefix}_epochs > 0 or {prefix}_max_steps > 0.")


def check_same_grid(pairs: list, method: str) -> None:
    """Refuse, before training, a pair of different grids (maps of other sizes under `allow_resize`) for a method that
    compares teacher and student features position by position. Student tokens against a teacher map of as many
    pixels compare once `on_teacher_grid` has laid them out as that map."""
    for pair in pairs:
        tokens_on_map = len(pair.student.spatial) == 1 and len(pair.teacher.spatial) == 2
        if pair.teacher.spatial != pair.student.spatial and not tokens_on_map:
            raise ValueError(f"Method {method!r} compares features position by position, and the pair "
                             f"'{pair.teacher.path}:{pair.student.path}' joins teacher {pair.teacher} with student "
                             f"{pair.student}. Pair layers of one grid, or use method 'srm' (maps of other sizes "
                             "with allow_resize=True) or 'reviewkd' (maps).")


def on_teacher_grid(feature: torch.Tensor, teacher_spatial: tuple[int, ...]) -> torch.Tensor:
    """Student tokens [N, L, C] as a map [N, C, H, W] on the teacher's grid (H, W): the leading L − H·W (class)
    tokens dropped, the others pixels in row-major order, as `taps.plan_taps` pairs them. A view; any other feature
    is returned as it is."""
    if feature.dim() != 3 or len(teacher_spatial) != 2:
        return feature
    h, w = teacher_spatial
    return feature[:, feature.shape[1] - h * w:].transpose(1, 2).unflatten(2, (h, w))


def linear_warmup(progress: float, warmup_ratio: float) -> float:
    """min(progress / warmup_ratio, 1): the weight of a distillation term that ramps up linearly over the first
    `warmup_ratio` of the stage; 1 throughout when `warmup_ratio` is 0."""
    if warmup_ratio <= 0:
        return 1.0
    return min(progress / warmup_ratio, 1.0)
