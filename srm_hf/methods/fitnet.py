"""FitNets (Romero et al., ICLR 2015, arXiv 1412.6550): a hint stage, then KD.

Stage `hint`: each student tap, mapped to the teacher's channels by a 1×1 regressor, regresses the paired teacher
tap (MSE; student tokens against a teacher map are laid out as that map); the student's classifier is not trained.
Stage `kd`: Hinton KD on the whole student. The regressors are training-only: they live on the method, never in the
exported student.

Against the paper and mdistiller (`FitNet`, `ConvReg`): they guide one middle layer (mdistiller's hint layer 2)
with a regressor of 1×1 convolution, batch norm and ReLU; here every tap pair is a hint (with the default pairing:
every stage map and the pooled vector, the MSEs summed) and the regressor is linear. For the paper's single hint,
pass one pair, e.g. `layer_pairs=["layer2:layer2"]`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..srm import project
from .base import Method, StageSpec, check_same_grid, check_stage_length, on_teacher_grid
from .kd import kd_stage, kd_terms


def fitnet_loss(regressed: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015, arXiv 1412.6550): MSE between the teacher's hint layer and the
    student's guided layer mapped to the teacher's channels by a regressor (here a 1×1 projection).

    Paper vs code: the paper writes ½‖u_h − r(v_g)‖²; this is its mean over N·C·H·W (scale only)."""
    return F.mse_loss(regressed.float(), teacher_feature.float())

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


class FitNet(Method):
    name = "fitnet"
    uses_taps = True
    config_prefixes = ("fitnet", "kd")
    citation = """@inproceedings{romero2015fitnets,
  title     = {FitNets: Hints for Thin Deep Nets},
  author    = {Romero, Adriana and Ballas, Nicolas and Kahou, Samira Ebrahimi and Chassang, Antoine and Gatta, Carlo
               and Bengio, Yoshua},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2015}
}"""

    def __init__(self, hint_epochs: float = 1.0, hint_max_steps: int = -1, kd_alpha: float = 0.5,
                 kd_temperature: float = 4.0):
        super().__init__()
        check_stage_length("fitnet", hint_epochs, hint_max_steps)
        self.hint_epochs, self.hint_max_steps = hint_epochs, hint_max_steps
        self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
        self.regressors = nn.ModuleDict()

    @classmethod
    def from_config(cls, args) -> "FitNet":
        return cls(args.fitnet_epochs, args.fitnet_max_steps, args.kd_alpha, args.kd_temperature)

    def build(self, pairs):
        super().build(pairs)
        check_same_grid(pairs, self.name)
        for pair in pairs:
            self.regressors[pair.key] = HintRegressor(pair.student.channels, pair.teacher.channels)

    def stages(self) -> list[StageSpec]:
        return [StageSpec("hint", trains=("student", "regressors"), epochs=self.hint_epochs,
                          max_steps=self.hint_max_steps),
                kd_stage(self.kd_alpha)]

    def loss(self, stage, student, teacher, labels):
        if stage.name == "hint":
            regressed = {p.key: on_teacher_grid(self.regressors[p.key](student.features[p.key]), p.teacher.spatial)
                         for p in self.pairs}  # as the teacher's: [N, C_t, H, W] or [N, C_t]
            return {"mse": sum(fitnet_loss(regressed[k], t) for k, t in teacher.features.items())}
        return kd_terms(student.logits, teacher, labels, self.kd_alpha, self.kd_temperature, self.label_smoothing)

    def describe(self) -> dict:
        return {"name": self.name, "kd_alpha": self.kd_alpha, "kd_temperature": self.kd_temperature}
