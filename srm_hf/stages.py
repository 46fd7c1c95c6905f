"""The stage plan: which stage runs at which optimizer step, what it trains, and its learning-rate schedule.

A method declares its stages (`srm_hf.methods.base.StageSpec`); the trainer sizes them into a `StagePlan` and runs
them all inside ONE `Trainer.train()` loop, one after the other on the global step counter, so checkpoints,
logging and `resume_from_checkpoint` work across and inside stages. Each parameter group has a learning-rate
multiplier that is 0 outside the stages that train it and follows the configured schedule (warmup included)
inside each of them, restarted per stage.
"""

import math
from dataclasses import dataclass, replace

import torch
from transformers import get_scheduler
from transformers.utils import logging

from .methods.base import StageSpec
from .reference import phase_starts, step_decay

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Stage:
    """A stage of the plan: its spec, where it starts and how long it lasts; `step` is the step inside it."""

    spec: StageSpec
    index: int  # 1-based position in the plan
    start: int  # first global step (0-based)
    steps: int
    step: int = 0  # 0-based optimizer step inside the stage (set by `StagePlan.stage_at`)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def groups(self) -> tuple[str, ...]:
        return self.spec.trains

    @property
    def final(self) -> bool:
        """Whether this is the method's final stage (sized by the run's `num_train_epochs` / `max_steps`): the only
        one evaluated, early-stopped and selected on, and the one with the run's schedule. `train_stages` may run a
        plan without it."""
        return self.spec.epochs is None and self.spec.max_steps <= 0

    @property
    def progress(self) -> float:
        """Fraction of the stage done once the current step is taken, in (0, 1]."""
        return (self.step + 1) / self.steps


class StagePlan:
    def __init__(self, specs_and_steps: list[tuple[StageSpec, int]]):
        self.stages, start = [], 0
        for i, (spec, steps) in enumerate(specs_and_steps, start=1):
            stage = Stage(spec, i, start, steps)
            if steps <= 0:
                raise ValueError(f"Stage '{spec.name}' has {steps} steps: give it a positive number of epochs or "
                                 "steps" + (" (the run's num_train_epochs or max_steps)." if stage.final else "."))
            self.stages.append(stage)
            start += steps

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_at(self, step: int) -> Stage:
        """The stage that the optimizer step number `step` (0-based, i.e. `state.global_step`) belongs to."""
        stage = next((s for s in self.stages if step < s.end), self.stages[-1])
        return replace(stage, step=min(step - stage.start, stage.steps - 1))

    def __str__(self) -> str:
        return " -> ".join(f"{s.index}. {s.name} ({s.steps} steps)" for s in self.stages)

    def describe(self) -> list[list]:
        """[[stage name, steps], ...]: what a checkpoint records of the plan it was written under."""
        return [[s.name, s.steps] for s in self.stages]


def check_stage_lengths(specs: list[StageSpec], method: str) -> None:
    """Every stage but the last has a length of its own (`epochs` or `max_steps`); the last has none: the run's
    `num_train_epochs` / `max_steps` size it, and it is the stage evaluated (`Stage.final`)."""
    *earlier, last = specs
    unsized = [s.name for s in earlier if s.epochs is None and s.max_steps <= 0]
    if unsized or last.epochs is not None or last.max_steps > 0:
        raise ValueError(
            f"Method {method!r} declares stages {[s.name for s in specs]}: every stage but the last needs its own "
            f"epochs or max_steps ({unsized or 'they have'}), and the last none (its length is the run's "
            f"num_train_epochs / max_steps; '{last.name}' has epochs={last.epochs}, max_steps={last.max_steps}). "
            "Fix the StageSpecs in stages()."
        )


def check_stage_selection(method, names: list[str], done: set[str], resuming: bool = False) -> list[str]:
    """The method's stage names, once `names` (for `train_stages`) are known stages whose earlier stages have run
    (`done`), run with them, or are in the checkpoint resumed: a stage never runs on what an earlier one has not
    learnt yet."""
    known = [s.name for s in method.stages()]
    if (unknown := [n for n in names if n not in known]) or not names:
        raise ValueError(f"Method {method.name!r} has no stage {unknown or names}: its stages are {known}.")
    missing = [] if resuming else [k for k in known[:max(known.index(n) for n in names)] if k not in done | set(names)]
    if missing:
        raise ValueError(f"train_stages({names}) would run before stage {missing} of method {method.name!r}, which "
                         f"has not run yet and which they build on. Run train_stages({missing + list(names)}), or "
                         f"the earlier stages first.")
    return known


def stage_steps(spec: StageSpec, steps_per_epoch: int | None, last_stage_steps: int) -> int:
    """A stage's length: its `max_steps` if > 0, else `epochs` passes over the data; the last stage (no epochs of
    its own) takes the length TrainingArguments gives the run."""
    if spec.max_steps > 0:
        return spec.max_steps
    if spec.epochs is None:
        return last_stage_steps
    if steps_per_epoch is None:
        raise ValueError(
            f"Stage '{spec.name}' is sized in epochs but the training dataset has no length; set its max_steps."
        )
    return max(1, math.ceil(spec.epochs * steps_per_epoch))


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


def _stage_lambda(stage: Stage, args, last: bool, lr: float) -> object:
    """The `lr_lambda` transformers' `get_scheduler` builds for one stage of `stage.steps` steps, for a param group
    of learning rate `lr` (absolute kwargs such as `min_lr` or `lr_end` are read against it); under
    `preset="reference"`, the reference's step decay."""
    if getattr(args, "preset", "trainer") == "reference":
        return step_decay(stage.name, stage.steps, last)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr or 1.0)
    constant = stage.spec.constant_lr
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))  # as the user wrote it
    if not constant and (warmup := args.get_warmup_steps(stage.steps)) >= stage.steps > 1:
        logger.warning_once(f"warmup_steps={args.warmup_steps} warms stage '{stage.name}' up over {warmup} steps of "
                            f"its {stage.steps}: it never reaches its learning rate (each stage restarts the schedule)."
                            " Give warmup_steps as a share of each stage (e.g. 0.1), or fewer steps.")
    try:
        scheduler = get_scheduler(
            "constant" if constant else args.lr_scheduler_type,
            optimizer=dummy,
            num_warmup_steps=0 if constant else args.get_warmup_steps(stage.steps),
            num_training_steps=stage.steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
    except (TypeError, ValueError) as e:  # e.g. a keyword the schedule needs, missing from lr_scheduler_kwargs
        raise ValueError(f"lr_scheduler_type={kind!r} with lr_scheduler_kwargs={args.lr_scheduler_kwargs or {}} "
                         f"cannot build its schedule: {e}. Give the schedule's keywords in lr_scheduler_kwargs.") from e
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"lr_scheduler_type={kind!r} cannot be restarted per stage; use a step-based schedule "
            "such as 'linear', 'cosine', 'constant' or 'constant_with_warmup'."
        )
    return scheduler.lr_lambdas[0]


def check_schedule(args) -> None:
    """Build the schedule of a 10-step final stage once, so that a schedule that cannot follow the stages (or lacks
    its keywords) is refused with the config, before anything trains."""
    _stage_lambda(Stage(StageSpec("check"), 1, 0, 10), args, True, args.learning_rate)


class StageScheduler(torch.optim.lr_scheduler.LambdaLR):
    """The run's schedule (`stage_scheduler`): a LambdaLR whose multipliers follow the stage plan."""


def check_stage_scheduler(scheduler) -> None:
    """Refuse a torch scheduler that is not the stage plan's: it would train every group in every stage."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) and not isinstance(scheduler, StageScheduler):
        raise ValueError(
            f"The learning-rate scheduler is a {type(scheduler).__name__}, not the stage schedule: the stages need "
            "each param group's learning rate at 0 outside the stages that train it. Let create_scheduler build it "
            "(an override returns srm_hf.stages.stage_scheduler(optimizer, trainer.plan, args)), and choose its "
            "shape with lr_scheduler_type, lr_scheduler_kwargs and warmup_steps."
        )


def stage_scheduler(optimizer, plan: StagePlan, args) -> StageScheduler:
    """One LambdaLR over the whole run; each param group (tagged `stage_group`) follows its stages' schedules."""
    if plan is None:
        raise RuntimeError("The learning-rate schedule follows the stage plan, which train() builds from the "
                           "training set's size: create the scheduler inside train() (override create_scheduler, "
                           "which train() calls), not before it. create_optimizer() alone works before train().")
    lambdas = {}  # (stage, learning rate) -> lr_lambda
    multipliers = []
    for group in optimizer.param_groups:
        lr = group.get("initial_lr", group["lr"])
        stages = [s for s in plan.stages if group["stage_group"] in s.groups]
        for s in stages:
            if (s.index, lr) not in lambdas:
                lambdas[s.index, lr] = _stage_lambda(s, args, s.final, lr)
        multipliers.append(_stage_multiplier([(s.start, s.end, lambdas[s.index, lr]) for s in stages]))
    return StageScheduler(optimizer, multipliers)


def resets_moments(stage: Stage, plan: StagePlan, args) -> bool:
    """Whether the optimizer moments of what `stage` trains restart at its current step: at the start of every stage
    after the first (as separate runs would), and under `preset="reference"` at each learning-rate drop."""
    if stage.step == 0:
        return stage.start > 0
    reference = getattr(args, "preset", "trainer") == "reference"
    return reference and stage.step in phase_starts(stage.name, stage.steps, stage.final)
