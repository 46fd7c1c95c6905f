"""The stage plan: which stage runs at which optimizer step, what it trains, and its learning-rate schedule.

All stages run inside ONE `Trainer.train()` loop, one after the other on the global step counter, so
checkpoints, logging and `resume_from_checkpoint` work across and inside stages. Each parameter group has a
learning-rate multiplier that is 0 outside the stages that train it and follows the configured schedule
(warmup included) inside each of them, restarted per stage.
"""

import math
from dataclasses import dataclass

import torch
from transformers import get_scheduler

# Which parameter groups each stage trains.
STAGE_GROUPS = {
    "dictionary": ("dictionary",),
    "srm": ("student", "heads"),
    "kd": ("student",),
    "joint": ("student", "heads"),
    "hint": ("student", "regressors"),  # FitNet stage 1
    "at": ("student",),
    "ce": ("student",),  # the student alone
}
# Stages whose schedule is constant: the dictionary is fitted with a fixed learning rate, as in the reference.
CONSTANT_SCHEDULE = ("dictionary",)


@dataclass(frozen=True)
class Stage:
    name: str
    index: int  # 1-based position in the plan
    start: int  # first global step (0-based)
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def groups(self) -> tuple[str, ...]:
        return STAGE_GROUPS[self.name]


class StagePlan:
    def __init__(self, names_and_steps: list[tuple[str, int]]):
        self.stages, start = [], 0
        for i, (name, steps) in enumerate(names_and_steps, start=1):
            if steps <= 0:
                raise ValueError(f"Stage '{name}' has {steps} steps: give it a positive number of epochs or steps.")
            self.stages.append(Stage(name, i, start, steps))
            start += steps

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_at(self, step: int) -> Stage:
        """The stage that the optimizer step number `step` (0-based, i.e. `state.global_step`) belongs to."""
        for stage in self.stages:
            if step < stage.end:
                return stage
        return self.stages[-1]

    def __str__(self) -> str:
        return " -> ".join(f"{s.index}. {s.name} ({s.steps} steps)" for s in self.stages)


def stage_steps(epochs: float, max_steps: int, steps_per_epoch: int | None, name: str) -> int:
    """A stage's length: `max_steps` if > 0, else `epochs` passes over the data."""
    if max_steps > 0:
        return max_steps
    if steps_per_epoch is None:
        raise ValueError(
            f"Stage '{name}' is sized in epochs but the training dataset has no length; set its max_steps instead."
        )
    return max(1, math.ceil(epochs * steps_per_epoch))


def _stage_multiplier(windows: list[tuple[int, int, object]]):
    """Learning-rate multiplier of one parameter group as a function of the global step.

    A plain function, so LambdaLR's state_dict keeps only the step count: the plan is rebuilt on resume.
    """

    def multiplier(step: int) -> float:
        for start, end, fn in windows:  # (start, end, lr_lambda of the stage's own schedule)
            if start <= step < end:
                return fn(step - start)
        return 0.0

    return multiplier


def _stage_lambda(name: str, steps: int, args) -> object:
    """The `lr_lambda` transformers' `get_scheduler` builds for one stage of `steps` steps."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = "constant" if name in CONSTANT_SCHEDULE else args.lr_scheduler_type
    warmup = 0 if name in CONSTANT_SCHEDULE else args.get_warmup_steps(steps)
    scheduler = get_scheduler(
        schedule,
        optimizer=dummy,
        num_warmup_steps=warmup,
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"lr_scheduler_type={args.lr_scheduler_type!r} cannot be restarted per stage; use a step-based schedule "
            "such as 'linear', 'cosine', 'constant' or 'constant_with_warmup'."
        )
    return scheduler.lr_lambdas[0]


def stage_scheduler(optimizer, plan: StagePlan, args) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR over the whole run; each param group (tagged `srm_group`) follows its stages' schedules."""
    lambdas = {s.index: _stage_lambda(s.name, s.steps, args) for s in plan.stages}
    multipliers = []
    for group in optimizer.param_groups:
        windows = [(s.start, s.end, lambdas[s.index]) for s in plan.stages if group["srm_group"] in s.groups]
        multipliers.append(_stage_multiplier(windows))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers)
