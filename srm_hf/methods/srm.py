"""Sparse Representation Matching (Tran, Gabbouj, Iosifidis, arXiv 2103.17012) as a method: its stages and loss.

    paper: 1. dictionary  MSE(T, D·λ)                         trains the dictionaries (constant learning rate)
           2. srm         Σ_taps [CE(p, y) + BCE(ḡ, g)]        trains the student backbone and the heads
           3. kd          α·T²·KL + (1-α)·CE                   trains the whole student
    joint: 1. dictionary, then 2. joint: α·T²·KL + (1-α)·CE + λ·SRM, one teacher forward per step

The building blocks (`SparseCoder`, `SRMHead`, `srm_loss`) are in `srm_hf.srm`. Override `tap_loss` to change the
SRM loss of one tap (e.g. weight taps differently).
"""

import json
import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import read_matching, save_safetensors
from ..forward import runs_as_written
from ..fused import grid, use_fused
from ..srm import (SparseCoder, SRMHead, num_active_for, num_atoms_for, resize_like, srm_loss, srm_loss_fused,
                   srm_loss_projected)
from .base import Features, Method, StageSpec, check_stage_length
from .kd import kd_stage, kd_terms

MODES = ("paper", "joint")
DICTIONARY_NAME = "srm_dictionary.safetensors"  # the dictionaries alone, for `srm_dictionary_path`
TARGETS = ("both", "pixel", "image")


def add_terms(terms: dict[str, torch.Tensor], new: dict[str, torch.Tensor], weight: float = 1.0) -> None:
    """terms[name] += weight × new[name] for every new term (a weight of 1 adds no multiplication)."""
    for name, value in new.items():
        value = weight * value if weight != 1.0 else value
        terms[name] = terms[name] + value if name in terms else value


class SRM(Method):
    name = "srm"
    uses_taps = True
    config_prefixes = ("srm", "kd")
    citation = """@article{tran2021srm,
  title   = {Knowledge Distillation By Sparse Representation Matching},
  author  = {Tran, Dat Thanh and Gabbouj, Moncef and Iosifidis, Alexandros},
  journal = {arXiv preprint arXiv:2103.17012},
  year    = {2021}
}"""

    def __init__(self, mode: str = "paper", codeword_multiplier: float = 2.0, sparsity_multiplier: float = 0.02,
                 targets: str = "both", pixel_weight: float = 1.0, image_weight: float = 1.0,
                 pixel_ce_on_sigmoid: bool = True, weight: float = 1.0, kd_alpha: float = 0.5,
                 kd_temperature: float = 4.0, dictionary_epochs: float = 1.0, dictionary_max_steps: int = -1,
                 dictionary_learning_rate: float = 1e-3, dictionary_path: str | None = None,
                 srm_epochs: float = 1.0, srm_max_steps: int = -1, kernels: str = "auto",
                 kernel_projections: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"srm_mode={mode!r} is not one of {MODES}: use 'paper' (three stages) or 'joint'.")
        if targets not in TARGETS:
            raise ValueError(f"srm_targets={targets!r} is not one of {TARGETS}.")
        self.mode, self.m, self.s, self.targets_kind = mode, codeword_multiplier, sparsity_multiplier, targets
        self.pixel_weight = pixel_weight if targets in ("both", "pixel") else 0.0
        self.image_weight = image_weight if targets in ("both", "image") else 0.0
        self.pixel_ce_on_sigmoid, self.weight = pixel_ce_on_sigmoid, weight
        self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
        self.dictionary_epochs, self.dictionary_max_steps = dictionary_epochs, dictionary_max_steps
        self.dictionary_learning_rate, self.dictionary_path = dictionary_learning_rate, dictionary_path
        self.srm_epochs, self.srm_max_steps, self.kernels = srm_epochs, srm_max_steps, kernels
        self.kernel_projections = kernel_projections  # the projections inside the kernels too (`fused=True` only)
        check_stage_length("srm_dictionary", dictionary_epochs, dictionary_max_steps)
        if mode == "paper":  # joint mode has no SRM stage of its own
            check_stage_length("srm", srm_epochs, srm_max_steps)
        self.dictionary_ready = False  # set once a dictionary is loaded: stage 1 is skipped
        self.dictionary_learnt = False  # set once stage 1 has finished, here or in the checkpoint resumed
        self.coders = nn.ModuleDict()  # one SparseCoder per teacher tap
        self.heads = nn.ModuleDict()  # one SRMHead per student tap

    @classmethod
    def from_config(cls, args) -> "SRM":
        return cls(args.srm_mode, args.srm_codeword_multiplier, args.srm_sparsity_multiplier, args.srm_targets,
                   args.srm_pixel_weight, args.srm_image_weight, args.srm_pixel_ce_on_sigmoid, args.srm_weight,
                   args.kd_alpha, args.kd_temperature, args.srm_dictionary_epochs, args.srm_dictionary_max_steps,
                   args.srm_dictionary_learning_rate, args.srm_dictionary_path, args.srm_epochs, args.srm_max_steps,
                   args.srm_kernels, args.srm_kernel_projections)

    def build(self, pairs):
        super().build(pairs)
        for pair in pairs:
            c = pair.teacher.channels
            num_atoms = num_atoms_for(c, self.m)
            if num_atoms < 2:  # one atom: every pixel label is 0, the pixel term is constant
                raise ValueError(f"srm_codeword_multiplier={self.m} gives the tap {pair.teacher} a dictionary of "
                                 f"{num_atoms} atom (K = int(m·C)): SRM needs 2 or more. Use m >= {2 / c:.3g}.")
            self.coders[pair.key] = SparseCoder(c, num_atoms, num_active_for(c, self.m, self.s))
            self.heads[pair.key] = SRMHead(pair.student.channels, num_atoms)
        if self.dictionary_path:
            self.load_dictionary(self.dictionary_path)

    def stages(self) -> list[StageSpec]:
        dictionary = [] if self.dictionary_ready else [
            StageSpec("dictionary", trains=("coders",), epochs=self.dictionary_epochs,
                      max_steps=self.dictionary_max_steps, runs_student=False, constant_lr=True)]
        if self.mode == "joint":
            return dictionary + [StageSpec("joint", trains=("student", "heads"))]
        return dictionary + [StageSpec("srm", trains=("student", "heads"), epochs=self.srm_epochs,
                                       max_steps=self.srm_max_steps),
                             kd_stage(self.kd_alpha)]

    def stage_finished(self, stage) -> None:
        self.dictionary_learnt |= stage.name == "dictionary"

    def group_options(self, group: str) -> dict:
        return {"lr": self.dictionary_learning_rate, "weight_decay": 0.0} if group == "coders" else {}

    # ---- loss ----------------------------------------------------------------------------------------------

    def loss(self, stage, student, teacher, labels):
        if stage.name == "dictionary":  # Σ_taps MSE(T, T̂)
            terms = {}
            for key, features in teacher.features.items():
                fused = use_fused(self.kernels, features)
                loss = self.coders[key].reconstruction_loss(features, fused, projected=self.kernel_projections)
                add_terms(terms, {"mse": loss})
            return terms
        terms = {}
        if stage.name in ("kd", "joint"):
            terms.update(kd_terms(student.logits, teacher, labels, self.kd_alpha, self.kd_temperature,
                                  self.label_smoothing))
        if stage.name in ("srm", "joint"):
            targets = teacher.targets or self.targets(teacher.features)
            srm_terms = {}  # Σ_taps, per term
            for pair in self.pairs:
                feature = student.features[pair.key]
                tap_terms = self.projected_tap_loss(pair, feature, *targets[pair.key])
                if tap_terms is None:
                    tap_terms = self.tap_loss(pair, self.head_logits(pair, feature), *targets[pair.key])
                add_terms(srm_terms, tap_terms)
            add_terms(terms, srm_terms, self.weight if stage.name == "joint" else 1.0)
        return terms

    def prepare_teacher(self, stage, teacher: Features) -> None:
        """The labels replace the teacher's maps before the student runs (their float32 projections then never sit
        beside the student's activations); the KD stage drops the maps, which it does not read."""
        if stage.name in ("srm", "joint"):
            teacher.targets = self.targets(teacher.features)
        if stage.name in ("kd", "srm", "joint"):
            teacher.features = {}

    def head_logits(self, pair, feature: torch.Tensor) -> torch.Tensor:
        """The student head's logits for one tap, on the teacher's grid: [N, K, H, W], [N, L, K] or [N, K]."""
        head = self.heads[pair.key](feature)
        if head.dim() == 3 and head.shape[1] > pair.teacher.num_pixels:  # drop leading class tokens
            head = head[:, head.shape[1] - pair.teacher.num_pixels:]
        return resize_like(head, pair.teacher.spatial)

    def tap_loss(self, pair, head_logits: torch.Tensor, pixel_labels: torch.Tensor,
                 image_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """SRM loss of one tap: {"pixel": weighted CE, "image": weighted BCE}. Fused kernels on CUDA (`srm_kernels`);
        the eager loss is recomputed in backward. Either way no K-channel sigmoid / softmax map is kept for backward.
        An override may return other terms: each name is summed over taps, scaled by `srm_weight` in the joint stage
        and added to a KD term of the same name."""
        args = (head_logits, pixel_labels, image_labels, self.pixel_weight, self.image_weight, self.pixel_ce_on_sigmoid)
        if use_fused(self.kernels, head_logits):
            return srm_loss_fused(*args)
        return checkpoint(srm_loss, *args, use_reentrant=False)

    def projected_tap_loss(self, pair, feature: torch.Tensor, pixel_labels: torch.Tensor,
                           image_labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """`tap_loss(pair, head_logits(pair, feature), ...)` with the head's projection inside the fused loss kernels
        (`srm_hf.fused_loss`: no logits in memory), or None where that path does not apply: the eager maths chosen
        (`srm_kernels`) or the projections left to torch (`srm_kernel_projections`), `head_logits` or `tap_loss`
        overridden (they run instead), a head that is not a plain
        `SRMHead` (a subclass, forward hooks, a wrapper: it is called instead), head logits that need class tokens
        dropped or a resize onto the teacher's grid."""
        if not self.kernel_projections or not use_fused(self.kernels, feature) or \
                type(self).head_logits is not SRM.head_logits or \
                type(self).tap_loss is not SRM.tap_loss or not runs_as_written(self.heads[pair.key], SRMHead):
            return None
        if grid(feature) != tuple(pair.teacher.spatial):
            return None
        return srm_loss_projected(feature, self.heads[pair.key], pixel_labels, image_labels, self.pixel_weight,
                                  self.image_weight, self.pixel_ce_on_sigmoid)

    @torch.no_grad()
    def targets(self, teacher_features: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per tap: (pixel labels [N, H, W] long, image labels [N, K]) from the teacher's sparse codes, in float32
        whatever precision the teacher ran in."""
        device = next(self.coders.parameters()).device.type
        with torch.autocast(device_type=device, enabled=False):
            return {k: self.coders[k].targets(v, use_fused(self.kernels, v), projected=self.kernel_projections)
                    for k, v in teacher_features.items()}

    # ---- dictionary files ----------------------------------------------------------------------------------

    def tap_metadata(self) -> list[dict]:
        return [{"teacher": p.teacher.path, "student": p.student.path, "channels": p.teacher.channels}
                for p in self.pairs]

    def save_dictionary(self, path: str) -> str:
        """Write the dictionaries alone (`srm_dictionary.safetensors`, into `path` if it is a folder), with the
        teacher and the atoms kept per pixel they were learnt for, to skip stage 1 next time. Refused before stage 1
        has finished: the atoms are still random, and a run loading them would skip learning them."""
        if not (self.dictionary_learnt or self.dictionary_ready):
            raise RuntimeError(
                "The SRM dictionary is not learnt yet: stage 1 ('dictionary') has not finished in this trainer, so "
                "its atoms are random and a run loading them would skip learning them. Call trainer.train() or "
                "trainer.train_stages(['dictionary']) first (or resume a checkpoint written after stage 1)."
            )
        path = os.path.join(path, DICTIONARY_NAME) if os.path.isdir(path) else path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.coders.state_dict().items()}
        save_safetensors(state, path, {"taps": json.dumps(self.tap_metadata()), **self.dictionary_provenance()})
        return path

    def dictionary_provenance(self) -> dict[str, str]:
        return {"teacher": self.teacher_fingerprint or "",
                "kept": json.dumps({key: coder.num_active for key, coder in self.coders.items()})}

    def load_dictionary(self, path: str) -> None:
        """Load dictionaries saved by `save_dictionary`, checking every tap and shape, the teacher and k; stage 1 is
        then skipped and the coders are frozen (`requires_grad=False`): no stage trains them."""
        path = os.path.join(path, DICTIONARY_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No SRM dictionary at {path}: pass a file written by save_dictionary().")
        saved, problems, metadata = read_matching(path, self.coders.state_dict())
        here = self.dictionary_provenance()
        problems = problems or "; ".join(f"{k}: {metadata[k]} there, {here[k]} here" for k in here  # older files:
                                         if metadata.get(k) and here[k] and metadata[k] != here[k])  # fewer records
        if problems:
            raise ValueError(
                f"{path} does not fit this teacher/student pairing ({problems}). It was saved for taps "
                f"{metadata.get('taps', '?')}. Use the same teacher, taps, srm_codeword_multiplier and "
                "srm_sparsity_multiplier as when it was saved, or drop srm_dictionary_path to learn a new dictionary."
            )
        self.coders.load_state_dict(saved)
        self.coders.requires_grad_(False)  # fixed by design: no stage trains a loaded dictionary
        self.dictionary_ready = True

    def describe(self) -> dict:
        return {"name": self.name, "mode": self.mode, "m": self.m, "s": self.s, "targets": self.targets_kind,
                "kd_alpha": self.kd_alpha, "kd_temperature": self.kd_temperature,
                "atoms K, kept k": {k: [c.num_atoms, c.num_active] for k, c in self.coders.items()}}
