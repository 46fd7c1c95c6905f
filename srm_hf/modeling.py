"""`DistillationModel`: the student together with its training-only modules.

The Trainer trains this one module, so the optimizer, DDP and checkpoints see the dictionaries, heads (SRM) or
regressors (FitNet) with the student; only `.student` is ever exported. Taps are keyed by module path with dots
replaced by dashes (`nn.ModuleDict` keys cannot hold dots).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from .hooks import FeatureHooks, TapInfo
from .hooks import model_logits as student_logits
from .srm import SparseCoder, SRMHead, num_active_for, num_atoms_for, project, resize_like


def tap_key(path: str) -> str:
    return path.replace(".", "-")


@dataclass(frozen=True)
class TapPair:
    teacher: TapInfo
    student: TapInfo

    @property
    def key(self) -> str:
        return tap_key(self.teacher.path)


@dataclass
class DistillationOutput(ModelOutput):
    logits: torch.Tensor | None = None
    head_logits: dict[str, torch.Tensor] | None = None  # per tap: [N, K, H, W] (teacher grid), [N, L, K] or [N, K]
    reconstructions: dict[str, torch.Tensor] | None = None  # per tap: teacher features rebuilt from sparse codes
    features: dict[str, torch.Tensor] | None = None  # per tap: the student's features, or (FitNet) their regression


class HintRegressor(nn.Module):
    """FitNet's regressor: a 1×1 projection of the student's guided layer to the teacher's channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight.T)  # fan-in = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype)
        return project(x, self.weight) + (bias[:, None, None] if x.dim() == 4 else bias)


class DistillationModel(nn.Module):
    """Student + one `SparseCoder` per teacher tap and one `SRMHead` per student tap (SRM), or one `HintRegressor`
    per pair (FitNet); the KD, AT and student-alone baselines add nothing."""

    accepts_loss_kwargs = False  # compute_loss returns batch means: the Trainer scales them for accumulation
    main_input_name = "pixel_values"

    def __init__(self, student: nn.Module, pairs: list[TapPair], codeword_multiplier: float,
                 sparsity_multiplier: float, method: str = "srm"):
        super().__init__()
        self.student = student
        self.pairs = list(pairs)
        self.coders = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.regressors = nn.ModuleDict()
        for pair in self.pairs:
            c = pair.teacher.channels
            if method == "srm":
                num_atoms = num_atoms_for(c, codeword_multiplier)
                num_active = num_active_for(c, codeword_multiplier, sparsity_multiplier)
                self.coders[pair.key] = SparseCoder(c, num_atoms, num_active)
                self.heads[pair.key] = SRMHead(pair.student.channels, num_atoms)
            elif method == "fitnet":
                self.regressors[pair.key] = HintRegressor(pair.student.channels, c)
        self.student_hooks = FeatureHooks(student, [p.student.path for p in self.pairs])

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_pixel_values: torch.Tensor | None = None,
        teacher_features: dict[str, torch.Tensor] | None = None,
        with_heads: bool = False,
        with_features: bool = False,
    ) -> DistillationOutput:
        """Stage 1: pass `teacher_features` (keyed by tap) to get their reconstructions; the student does not run.

        Otherwise runs the student on `pixel_values`; `with_heads` adds its SRM heads' logits on the tapped
        features, `with_features` the tapped features themselves (through the FitNet regressors if there are any).
        `labels` and `teacher_pixel_values` are accepted so that the Trainer keeps those columns; they are unused.
        """
        if teacher_features is not None:
            return DistillationOutput(
                reconstructions={k: self.coders[k](teacher_features[k])[1] for k in teacher_features}
            )
        logits = student_logits(self.student(pixel_values))
        features = self.student_hooks.pop()
        out_features = head_logits = None
        if with_features:
            out_features = {
                p.key: self.regressors[p.key](features[p.student.path]) if p.key in self.regressors
                else features[p.student.path]
                for p in self.pairs
            }
        if with_heads:
            head_logits = {}
            for pair in self.pairs:
                head = self.heads[pair.key](features[pair.student.path])
                if head.dim() == 3 and head.shape[1] > pair.teacher.num_pixels:  # drop leading class tokens
                    head = head[:, head.shape[1] - pair.teacher.num_pixels :]
                head_logits[pair.key] = resize_like(head, pair.teacher.spatial)
        # built in one go: DDP finds the tensors that need gradients among the output's keys
        return DistillationOutput(logits=logits, head_logits=head_logits, features=out_features)

    @torch.no_grad()
    def targets(self, teacher_features: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per tap: (pixel labels [N, H, W] long, image labels [N, K]) from the teacher's sparse codes, in float32
        whatever precision the teacher ran in."""
        with torch.autocast(device_type=next(self.parameters()).device.type, enabled=False):
            return {k: self.coders[k].targets(v.float()) for k, v in teacher_features.items()}
