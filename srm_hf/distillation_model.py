"""`DistillationModel`: the student together with the method's training-only modules.

The Trainer trains this one module, so the optimizer, DDP and checkpoints see the method's modules (dictionaries,
heads, regressors, fusion blocks) with the student; only `.student` is ever exported. The method's loss runs inside
`forward`, so DDP sees every parameter the step uses.
"""

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import IterableDataset
from transformers import default_data_collator
from transformers.trainer_utils import enable_full_determinism, set_seed
from transformers.utils import ModelOutput

from .forward import compile_in_place, hook_guards, in_layout, input_dtype, model_logits, to_channels_last
from .hooks import FeatureHooks, capturing
from .loading import ClassifierAdapter, check_label_names, load_image_classifier
from .methods import Features, Method
from .preflight import check_buildable, check_example_batch, check_samples, label_count
from .stages import check_stage_lengths
from .taps import plan_taps


@dataclass
class DistillationOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None  # the named loss terms of the step


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """What tells one set of weights from another, cheaply: class, size and a hash of every tensor's shape, sum and
    first values."""
    digest, count = hashlib.sha256(), 0
    for name, tensor in model.state_dict().items():
        count += tensor.numel()
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{flat.double().sum().item() if flat.numel() else 0:.10e}".encode())
        digest.update(flat[:1024].float().cpu().numpy().tobytes() if tensor.is_floating_point() else b"")
    return f"{type(model).__name__}, {count} values, sha256 {digest.hexdigest()[:16]}"


class DistillationModel(nn.Module):
    """Student + method (an `nn.Module` holding the method's own trainable modules)."""

    accepts_loss_kwargs = False  # forward returns batch means: the Trainer scales them for accumulation
    main_input_name = "pixel_values"

    def __init__(self, student: nn.Module, method: Method, pairs: list):
        super().__init__()
        self.student = student
        self.method = method
        self.compiled = False  # whether the student runs compiled (`compile_student`)
        self.pairs = list(pairs)
        self.provenance: dict = {}  # the teacher and data it was built for (`from_models`), checked on resume
        self.num_labels: int | None = None  # the classes teacher and student predict (`from_models`)
        self.nhwc = {"student": False, "teacher": False}  # which of the two run in channels_last (`from_models`)
        check_buildable(student, method)
        method.build(self.pairs)
        check_stage_lengths(method.stages(), method.name)
        self.check_stages_train_modules()
        self.student_hooks = FeatureHooks(student, {p.key: p.student.path for p in self.pairs},
                                          armed=False) if pairs else None  # capturing in `forward` alone

    def __getattr__(self, name: str):
        """`trainer.model` is this wrapper, not the student: a model's API asked of it names where it is."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("save_pretrained", "push_to_hub", "num_parameters", "device", "dtype", "get_input_embeddings"):
                raise AttributeError(f"DistillationModel (trainer.model: the student plus the method's modules) has "
                                     f"no attribute {name!r}: the student is trainer.distill_model.student; save or "
                                     "publish it with trainer.save_model() / trainer.push_to_hub().") from None
            raise

    @classmethod
    def from_models(cls, student: nn.Module | str | None, teacher: nn.Module | str | None, method: Method,
                    train_dataset, args, collate) -> tuple["DistillationModel", nn.Module]:
        """Load student and teacher if given by name, check that they fit (label counts), pair their taps if the
        method uses them (on the first training samples, batched by `collate`) and build the method's modules. The
        teacher's fingerprint and the training set's size go to `provenance`, which checkpoints carry. Returns the
        model and the teacher."""
        if student is None:
            raise ValueError("Pass the student as `model=` (an nn.Module, or a Hub id / local path).")
        teacher = teacher if teacher is not None else args.teacher_model_name_or_path
        if teacher is None:
            raise ValueError("No teacher: pass `teacher_model=` or set `teacher_model_name_or_path` in the config.")
        if isinstance(train_dataset, IterableDataset) or not (hasattr(train_dataset, "__len__")
                                                              and hasattr(train_dataset, "__getitem__")):
            raise ValueError(f"train_dataset is a {type(train_dataset).__name__}, an iterable or streaming dataset "
                             "(no indexing): the stage plan counts epochs and resumes by index. Pass a map-style "
                             "dataset (load it without streaming=True).")
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty: give it the training images (check the split and any filter).")
        # as the Trainer seeds before `model_init`: the seed draws the method's modules and any new classifier head
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        student = load_image_classifier(student) if isinstance(student, str) else student
        teacher = load_image_classifier(teacher) if isinstance(teacher, str) else teacher
        # `for_trainer`'s adapter (for the plain Trainer) is unwrapped: the classifier inside is what trains and saves
        student, teacher = (m.model if isinstance(m, ClassifierAdapter) else m for m in (student, teacher))
        for role, model in (("student", student), ("teacher", teacher)):
            if any(p.is_meta for p in model.parameters()):
                raise ValueError(f"The {role}'s parameters are on the meta device (shapes without data): load or "
                                 "initialise its weights first (e.g. model.to_empty(device='cpu'), then "
                                 "load_state_dict or init_weights).")
        if {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}:
            raise ValueError("The teacher and the student are one model, or share parameters: the teacher is frozen "
                             "for distillation, so the student would not train. Pass a student of its own (for "
                             "self-distillation, a fresh model or copy.deepcopy(teacher)).")
        samples = [train_dataset[i] for i in range(min(2, len(train_dataset)))]
        if collate is default_data_collator:  # a collator of the user's own may take tuples or images
            check_samples(samples)
        example = collate(samples)
        check_example_batch(example)
        pixel_values = example["pixel_values"].to(next(student.parameters()).device)
        teacher_pixel_values = example.get("teacher_pixel_values", example["pixel_values"])
        teacher_pixel_values = teacher_pixel_values.to(next(teacher.parameters()).device, input_dtype(teacher))
        # channels_last: weights and images in NHWC before the first forward, so that a model that cannot run so fails
        nhwc = {role: args.channels_last and to_channels_last(m) for role, m in (("student", student),
                                                                                  ("teacher", teacher))}
        pixel_values = in_layout(pixel_values, nhwc["student"])
        teacher_pixel_values = in_layout(teacher_pixel_values, nhwc["teacher"])
        teacher_labels = label_count(teacher, teacher_pixel_values, "teacher", nhwc["teacher"])
        student_labels = label_count(student, pixel_values, "student", nhwc["student"])
        if teacher_labels != student_labels:
            raise ValueError(
                f"The teacher predicts {teacher_labels} labels but the student {student_labels}. Create the student "
                "with the teacher's label count (num_labels= for transformers, num_classes= for timm)."
            )
        check_label_names(teacher, student)
        if not method.uses_taps and args.layer_pairs:
            raise ValueError(f"layer_pairs is set but method {method.name!r} uses no taps: remove layer_pairs.")
        pairs = plan_taps(teacher, student, teacher_pixel_values, pixel_values, args) if method.uses_taps else []
        method.teacher_fingerprint = fingerprint(teacher)  # before `build`, which may load artefacts made for one
        model = cls(student, method, pairs)
        if nhwc["student"]:  # the method's own convolutions (ReviewKD's) take the student's NHWC maps
            method.to(memory_format=torch.channels_last)
        model.num_labels, model.nhwc = teacher_labels, nhwc
        model.provenance = {"teacher": method.teacher_fingerprint, "train_examples": len(train_dataset),
                            "stage_batch_sizes": args.stage_batch_sizes}
        return model, teacher

    def stage_modules(self) -> dict[str, tuple[str, nn.Module]]:
        """What a stage can train (`StageSpec.trains`), by name: 'student' and each child module of the method, with
        the prefix of its parameters' names in this module ('student.', 'method.<name>.')."""
        return {"student": ("student.", self.student),
                **{name: (f"method.{name}.", child) for name, child in self.method.named_children()}}

    def stage_specs(self, skip: set[str] = frozenset()) -> list:
        """The method's stages minus `skip`, each checked to train only what exists."""
        groups = self.stage_modules()
        specs = [s for s in self.method.stages() if s.name not in skip]
        for spec in specs:
            if not set(spec.trains) <= set(groups):
                raise ValueError(f"Stage '{spec.name}' trains {spec.trains}, but only {sorted(groups)} exist: name "
                                 "'student' or the method's child modules in StageSpec.trains.")
        return specs

    def check_stages_train_modules(self) -> None:
        """Every trainable parameter of the method's modules belongs to a module that one of its stages trains (all
        of them, whatever `train_stages` runs later): else it keeps its initial value without a word. A module fixed
        by design (SRM's loaded dictionary) is frozen by the method (`requires_grad_(False)`) when it decides so."""
        specs = self.stage_specs()  # a name that is no module is refused first, with those that exist
        trained = {name for spec in specs for name in spec.trains}
        for name, (prefix, module) in self.stage_modules().items():
            if name == "student" or name in trained:
                continue
            if idle := [prefix + n for n, p in module.named_parameters() if p.requires_grad]:
                raise ValueError(
                    f"Method {self.method.name!r}: its module '{name}' has {len(idle)} trainable parameters (e.g. "
                    f"{idle[0]!r}) that none of its stages {[s.name for s in specs]} trains, so they would keep their "
                    f"initial values. Add '{name}' to the `trains` of the stage that should train it (StageSpec), "
                    f"or, if it is fixed by design, freeze it in the method (self.{name}.requires_grad_(False)).")

    @property
    def config(self):
        """The student's config (transformers), or None: what the Trainer reads of `model.config`."""
        return getattr(self.student, "config", None)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Delegated to the student's own mechanism: transformers' activation checkpointing (non-reentrant, so tapped
        features keep their gradient) or timm's `set_grad_checkpointing`."""
        student, kwargs = self.student, {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.24
            student.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        elif hasattr(student, "gradient_checkpointing_enable") and every_n_layers == 1 and not offload:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(student, "set_grad_checkpointing") and every_n_layers == 1 and not offload:
            if extra := {k: v for k, v in kwargs.items() if (k, v) != ("use_reentrant", False)}:
                raise ValueError(f"activation_checkpointing_kwargs={extra}: timm's checkpointing of the student "
                                 f"({type(student).__name__}, set_grad_checkpointing) takes no options, so they would "
                                 "be ignored. Leave them unset (it checkpoints non-reentrantly).")
            student.set_grad_checkpointing(True)
            self.timm_checkpointing = True
        else:
            raise ValueError(f"Activation (gradient) checkpointing is on, but the student ({type(student).__name__}) "
                             "has no checkpointing of its own for these settings (transformers or timm, every layer, "
                             "no offload): turn it off.")

    def compile_student(self, args) -> None:
        """`torch.compile` the student in place, after its taps are hooked (`compile_in_place`)."""
        compile_in_place(self.student, args)
        self.compiled = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The name transformers < 5.24 calls."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                teacher_pixel_values: torch.Tensor | None = None, stage=None,
                teacher: Features | None = None) -> DistillationOutput:
        """Without `stage` (evaluation, inference): the student's logits. With the running stage: the method's loss
        terms for this batch, given the teacher's `Features` (None in stages without the teacher).
        `teacher_pixel_values` is accepted so that the Trainer keeps that column; it is unused here."""
        if stage is not None and teacher is not None:
            self.method.prepare_teacher(stage, teacher)
        student = None
        if stage is None or stage.spec.runs_student:
            with hook_guards(self.compiled), capturing(self.student_hooks):
                logits = model_logits(self.student(pixel_values))
            student = Features(logits, self._student_features())
            if stage is None:
                return DistillationOutput(logits=logits)
        terms = self.method.loss(stage, student, teacher, labels)
        if not isinstance(terms, dict) or not terms or not all(isinstance(v, torch.Tensor) for v in terms.values()):
            got = {k: type(v).__name__ for k, v in terms.items()} if isinstance(terms, dict) else type(terms).__name__
            raise TypeError(f"Method {self.method.name!r} returned {got} from loss() in stage '{stage.name}': it must "
                            "return a non-empty dict of scalar tensors, one per term, e.g. "
                            "{'ce': F.cross_entropy(...)}.")
        if not_scalar := {k: tuple(v.shape) for k, v in terms.items() if v.dim()}:
            raise ValueError(f"Method {self.method.name!r} returned loss terms that are not scalars ({not_scalar}): "
                             "each term is one number for the batch; reduce it in loss(), e.g. with .mean().")
        # built in one go: DDP finds the tensors that need gradients among the output's values
        return DistillationOutput(loss=sum(terms.values()), logits=student.logits if student else None, terms=terms)

    def _student_features(self) -> dict[str, torch.Tensor]:
        if self.student_hooks is None:
            return {}
        try:
            return self.student_hooks.pop()
        except RuntimeError as e:
            if getattr(self, "timm_checkpointing", False):
                raise RuntimeError(
                    f"{e} timm's gradient checkpointing runs a stage's blocks without calling the stage module, so a "
                    "tap on the stage sees nothing: tap blocks inside it (e.g. 'layer1.0' in layer_pairs), or turn "
                    "gradient checkpointing off."
                ) from e
            raise

    def param_groups(self, decay_names: set[str], weight_decay: float) -> list[dict]:
        """Optimizer groups tagged `stage_group`: the student's, then those of each child module of the method with
        the method's options for it (e.g. the dictionaries' own learning rate); each split into the parameters named
        in `decay_names` (names in this module, e.g. 'student.fc.weight') and the others, without weight decay."""
        groups = []
        for tag, (prefix, module) in self.stage_modules().items():
            options = self.method.group_options(tag) if tag != "student" else {}
            named = [(prefix + n, p) for n, p in module.named_parameters() if p.requires_grad]
            decayed = {"params": [p for n, p in named if n in decay_names], "weight_decay": weight_decay, **options,
                       "stage_group": tag}
            exempt = {"params": [p for n, p in named if n not in decay_names], **options, "weight_decay": 0.0,
                      "stage_group": tag}
            if tag != "student" and decayed["weight_decay"] == 0.0:  # nothing decayed: one group for the module
                decayed, exempt = {**decayed, "params": [p for _, p in named]}, {"params": []}
            groups += [decayed, exempt]
        return [g for g in groups if g["params"]]
