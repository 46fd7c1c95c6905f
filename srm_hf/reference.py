"""`preset="reference"`: the training procedure of the SRM authors' code (viebboy/SRM, its CIFAR-100 runs).

`DistillationConfig(preset="trainer")` (the default) trains every stage the `Trainer` way: AdamW, the configured
schedule restarted per stage, clipping at `max_grad_norm`. `preset="reference"` instead does what the reference does
around the same maths:

- optimizer: Adam with *coupled* L2 weight decay (`torch.optim.Adam(weight_decay=...)`, `weight_decay` 1e-4 unless
  set) on every student parameter, BatchNorm and biases included, and on the method's heads; none on the
  dictionaries (`group_options`);
- learning rate: step decay ×0.1 twice in every stage, the dictionary stage included, at the reference's epoch
  shares (`PHASES`: dictionary 10/60/30, SRM 30/100/30, the last stage 30/100/70 epochs), with fresh optimizer
  moments at each drop (the reference builds a new optimizer per learning rate); no warm-up;
- no gradient clipping (`max_grad_norm=0`);
- per-stage model selection (`StageSelection`, at every epoch's end, or every `eval_steps` under
  `eval_strategy="steps"`): a stage that does not run the student (SRM's dictionary) keeps the
  state of its epoch with the lowest training loss; the other stages before the last keep the epoch with the lowest
  validation loss of the stage (SRM: pixel CE + image BCE); the last stage keeps the best validation
  `metric_for_best_model` (default accuracy; the loss without `compute_metrics`). Selection needs an
  `eval_dataset`; the best state is kept in memory, so resuming inside a stage restarts that stage's selection at
  the resumed epoch.

The reference's batch size per stage (512 / 384 / 128 on CIFAR) is `stage_batch_sizes` (`stage_batches.py`), which
any preset can use.
"""

import math

import torch
from transformers import TrainerCallback

from .forward import on_device
from .hooks import capturing

# Epochs per learning rate (1x, 0.1x, 0.01x) in the reference's CIFAR-100 configuration, by stage name.
PHASES = {"dictionary": (10, 60, 30), "srm": (30, 100, 30)}
LAST_STAGE_PHASES = (30, 100, 70)


def phase_starts(stage_name: str, steps: int, last: bool) -> list[int]:
    """Steps inside a stage of `steps` steps at which the learning rate drops ×0.1 (two drops)."""
    phases = LAST_STAGE_PHASES if last else PHASES.get(stage_name, LAST_STAGE_PHASES)
    total, starts, done = sum(phases), [], 0
    for epochs in phases[:-1]:
        done += epochs
        starts.append(min(steps - 1, max(1, math.floor(steps * done / total))))
    return starts


def step_decay(stage_name: str, steps: int, last: bool):
    """`lr_lambda` of a stage: 1 until the first drop, then 0.1, then 0.01."""
    starts = phase_starts(stage_name, steps, last)

    def multiplier(step: int) -> float:
        return 0.1 ** sum(step >= s for s in starts)

    return multiplier


def coupled_adam(groups: list[dict], args) -> torch.optim.Adam:
    """Adam whose weight decay is added to the gradient (L2), as `torch.optim.Adam(weight_decay=...)` does."""
    return torch.optim.Adam(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon)


def selection_interval(args, state, steps_per_epoch: int) -> int:
    """Steps between two candidates of a stage: `eval_steps` under `eval_strategy="steps"` (a ratio < 1 resolved by
    the Trainer into `state.eval_steps`), else an epoch."""
    if args.eval_strategy == "steps" and state.eval_steps:
        return max(1, int(state.eval_steps))
    return steps_per_epoch


class StageSelection(TrainerCallback):
    """Keeps, per stage, the state of the best epoch by the stage's criterion and puts it back when the stage ends.

    The state kept is what the stage trains (the student and/or the method's modules), in memory on the CPU."""

    def __init__(self, trainer):
        if isinstance(trainer.eval_dataset, dict):
            raise ValueError("preset='reference' selects each stage's best epoch on one validation set, and "
                             f"eval_dataset is a dict of {list(trainer.eval_dataset)}: pass the one to select on.")
        self.trainer = trainer
        self.best: tuple[float, dict] | None = None
        self.losses: list[float] = []
        self.training = False
        self.history: list[tuple[str, int, float]] = []  # (stage, global step, score) of every candidate

    def on_train_begin(self, args, state, control, **kwargs):
        self.training, self.best, self.losses, self.history = True, None, [], []

    # ---- criteria ----------------------------------------------------------------------------------------

    def _trained_state(self, stage) -> dict:
        model = self.trainer.distill_model
        modules = {name: getattr(model.method, name) for name in stage.groups if name != "student"}
        if "student" in stage.groups:
            modules["student"] = model.student
        return {f"{name}.{k}": v.detach().to("cpu", copy=True) for name, m in modules.items()
                for k, v in m.state_dict().items()}

    def _restore(self, stage, state: dict) -> None:
        model = self.trainer.distill_model
        for name in stage.groups:
            module = model.student if name == "student" else getattr(model.method, name)
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    @torch.no_grad()
    def validation_loss(self, stage) -> float:
        """The stage's loss on the eval split, the student in eval mode."""
        trainer, model = self.trainer, self.trainer.model
        was_training, total, count = model.training, 0.0, 0
        model.eval()
        try:
            for batch in trainer.get_eval_dataloader():
                batch = on_device(batch, trainer.args.device)
                with capturing(trainer.teacher_hooks):
                    teacher = trainer.teacher_forward(batch) if stage.spec.uses_teacher else None
                out = model(pixel_values=batch["pixel_values"], labels=batch.get("labels"), stage=stage, teacher=teacher)
                n = batch["pixel_values"].shape[0]
                total, count = total + float(out.loss) * n, count + n
        finally:
            model.train(was_training)
        return self._mean(total, count)

    def _mean(self, total: float, count: int) -> float:
        """The mean over every process's share, so that all processes keep the same epoch."""
        both = self.trainer.accelerator.reduce(torch.tensor([total, count], device=self.trainer.args.device), "sum")
        return float(both[0] / both[1].clamp(min=1))

    def score(self, stage) -> float:
        """Lower is better: the epoch's mean training loss in stages that do not run the student, else the stage's
        validation loss."""
        if stage.spec.runs_student:
            return self.validation_loss(stage)
        return self._mean(sum(self.losses), len(self.losses))

    def _consider(self, stage, step: int, score: float) -> None:
        if self.best is None or score < self.best[0]:
            self.best = (score, self._trained_state(stage))
        self.history.append((stage.name, step, score))

    # ---- events ------------------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        stage = trainer.plan.stage_at(state.global_step - 1)
        if stage.final:
            return
        self.losses.extend(float(loss) for loss in trainer.step_losses)
        every = selection_interval(args, state, (trainer.steps_per_epoch or {}).get(stage.name) or stage.steps)
        if (stage.step + 1) % every == 0 or stage.step + 1 == stage.steps:
            self._consider(stage, state.global_step, self.score(stage))
            self.losses = []
        if stage.step + 1 == stage.steps and self.best is not None:
            self._restore(stage, self.best[1])
            self.best = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """The last stage: the best `metric_for_best_model` among the evaluations (default: accuracy, or the loss
        without `compute_metrics`)."""
        trainer = self.trainer
        stage = trainer.plan.stage_at(max(state.global_step - 1, 0))
        if not self.training or not stage.final or not metrics or args.load_best_model_at_end or state.global_step == 0:
            return  # the Trainer's own best-model selection, when asked for, does it with checkpoints; eval_on_start
            # scores the untrained student, no candidate
        name = args.metric_for_best_model or ("accuracy" if trainer.compute_metrics is not None else "loss")
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise ValueError(f"preset='reference' selects the last stage's best epoch by {key!r}, which evaluation "
                             f"did not return (it returned {sorted(metrics)}): set metric_for_best_model.")
        higher = args.greater_is_better if args.greater_is_better is not None else not key.endswith("loss")
        self._consider(stage, state.global_step, -metrics[key] if higher else metrics[key])

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        if self.best is not None:
            self._restore(next(s for s in self.trainer.plan.stages if s.final), self.best[1])
            self.best = None
