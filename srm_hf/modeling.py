"""`DistillationModel`: the student together with its training-only SRM modules.

The Trainer trains this one module, so the optimizer, DDP and checkpoints see the dictionaries and heads with the
student; only `.student` is ever exported. Taps are keyed by module path with dots replaced by dashes
(`nn.ModuleDict` keys cannot hold dots).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from .hooks import FeatureHooks, TapInfo, first_tensor
from .srm import SparseCoder, SRMHead, num_active_for, num_atoms_for, resize_like


def tap_key(path: str) -> str:
    return path.replace(".", "-")


def student_logits(output) -> torch.Tensor:
    """Logits of any image classifier's output: a tensor (timm, plain modules) or a `ModelOutput`."""
    return output.logits if hasattr(output, "logits") else first_tensor(output)


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


class DistillationModel(nn.Module):
    """Student + one `SparseCoder` per teacher tap + one `SRMHead` per student tap."""

    accepts_loss_kwargs = False  # compute_loss returns batch means: the Trainer scales them for accumulation
    main_input_name = "pixel_values"

    def __init__(self, student: nn.Module, pairs: list[TapPair], codeword_multiplier: float, sparsity_multiplier: float):
        super().__init__()
        self.student = student
        self.pairs = list(pairs)
        self.coders = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for pair in self.pairs:
            c = pair.teacher.channels
            k_atoms = num_atoms_for(c, codeword_multiplier)
            self.coders[pair.key] = SparseCoder(c, k_atoms, num_active_for(c, codeword_multiplier, sparsity_multiplier))
            self.heads[pair.key] = SRMHead(pair.student.channels, k_atoms)
        self.student_hooks = FeatureHooks(student, [p.student.path for p in self.pairs])

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_pixel_values: torch.Tensor | None = None,
        teacher_features: dict[str, torch.Tensor] | None = None,
        with_heads: bool = False,
    ) -> DistillationOutput:
        """Stage 1: pass `teacher_features` (keyed by tap) to get their reconstructions; the student does not run.

        Otherwise runs the student on `pixel_values`, and with `with_heads` its SRM heads on the tapped features.
        `labels` and `teacher_pixel_values` are accepted so that the Trainer keeps those columns; they are unused.
        """
        if teacher_features is not None:
            return DistillationOutput(
                reconstructions={k: self.coders[k](teacher_features[k])[1] for k in teacher_features}
            )
        logits = student_logits(self.student(pixel_values))
        features = self.student_hooks.pop()
        if not with_heads:
            return DistillationOutput(logits=logits)
        head_logits = {}
        for pair in self.pairs:
            out = self.heads[pair.key](features[pair.student.path])
            if out.dim() == 3 and out.shape[1] > pair.teacher.num_pixels:  # drop leading class/register tokens
                out = out[:, out.shape[1] - pair.teacher.num_pixels :]
            head_logits[pair.key] = resize_like(out, pair.teacher.spatial)
        return DistillationOutput(logits=logits, head_logits=head_logits)

    @torch.no_grad()
    def targets(self, teacher_features: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per tap: (pixel labels [N, H, W] long, image labels [N, K]) from the teacher's sparse codes, in float32
        whatever precision the teacher ran in."""
        with torch.autocast(device_type=next(self.parameters()).device.type, enabled=False):
            return {k: self.coders[k].targets(v.float()) for k, v in teacher_features.items()}

    def srm_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the student: dictionaries and heads."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}
