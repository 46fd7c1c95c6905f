"""TrainerCallbacks of srm_hf."""

import logging as pylogging
import math
import sys

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging

from .resume import read_marker
from .stages import check_stage_scheduler
from .trainer_options import check_optimizer_holds
from .taps import format_tap_plan

logger = logging.get_logger(__name__)


def follow_log_level(args) -> None:
    """srm_hf's loggers (named `srm_hf.*`, outside transformers' tree) at the run's `log_level` when one is set (under
    "passive", the logging configuration's), printed to stderr as transformers prints its own unless the root logger
    has handlers of its own (a `logging.basicConfig`), which then get the records."""
    library = pylogging.getLogger("srm_hf")
    chosen = args.log_level if args.should_log else args.log_level_replica
    library.setLevel(args.get_process_log_level() if chosen != "passive" else pylogging.NOTSET)
    if not library.handlers and not pylogging.getLogger().handlers:
        library.addHandler(_Stderr())


class _Stderr(pylogging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a notebook's or a test's capture swaps it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class StageCallback(TrainerCallback):
    """Announces each stage as it starts, in the log and in the progress bar's description; keeps evaluation to the
    method's final stage, and evaluation, saving and logs to each stage's own passes; tells the method each stage
    finished."""

    def __init__(self, trainer):
        self.trainer = trainer
        follow_log_level(trainer.args)
        self._current = None
        self._finished: set[int] = set()  # indices of the stages the method has been told are finished

    def on_train_begin(self, args, state, control, **kwargs):
        """Before the first step: the schedule is the stages' one; the NaN guard's counts and the logged values start
        afresh, or from what the resumed checkpoint recorded."""
        trainer, self._current, self._finished = self.trainer, None, set()
        check_stage_scheduler(trainer.lr_scheduler)
        if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):  # those hold flattened copies
            check_optimizer_holds(trainer.optimizer, trainer.distill_model, trainer.plan)  # also under an override
        trainer.nonfinite.start(read_marker(trainer.resuming).get("nonfinite") if isinstance(trainer.resuming, str)
                                else None)
        trainer.logged.start(enabled=args.logging_strategy != "no", nan_filter=args.logging_nan_inf_filter)
        if isinstance(trainer.resuming, str):  # the checkpoint's learning rates are its plan's: this plan's instead
            scheduler = trainer.lr_scheduler  # (a plan that goes on after the checkpoint's trains other groups)
            for group, base, fn in zip(trainer.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * fn(scheduler.last_epoch)
        if not trainer.stages_done:  # a whole plan: what an earlier run trained is retrained
            trainer.stages_trained.clear()
        if state.is_world_process_zero:
            logger.info(f"Stage plan of method {self.trainer.method.name!r}: {self.trainer.plan}")
            logger.info(f"Tap pairs (teacher -> student):\n{format_tap_plan(self.trainer.tap_pairs)}")

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.nonfinite.settle()  # the last steps' outcomes, read from the device
        stage = self.trainer.plan.stage_at(state.global_step - 1)
        if stage.index not in self._finished and state.global_step > stage.start:  # stopped early (a callback)
            self.trainer.stages_trained[stage.name] = state.global_step - stage.start  # the steps it ran, for the card
        self.trainer.logged.start(args.logging_strategy != "no", args.logging_nan_inf_filter)  # later values: not kept

    def on_step_end(self, args, state, control, **kwargs):
        """The student is judged only in the method's final stage (before it, its classifier is frozen or untrained):
        no evaluation earlier, so early stopping and best-model selection see the final stage alone (also when
        `train_stages` runs earlier stages alone). "epoch" strategies (evaluation, saving, logging) count each stage's
        own passes over the data, which need not line up with the Trainer's epochs; a log window ends with its stage."""
        self.trainer.nonfinite.step_done()
        stage = self.trainer.plan.stage_at(state.global_step - 1)
        ends = state.global_step == stage.end
        if ends:
            self._finish(stage)
            control.should_log |= args.logging_strategy != "no"
        per_epoch = (self.trainer.steps_per_epoch or {}).get(stage.name)
        if ends or per_epoch and (state.global_step - stage.start) % per_epoch == 0:
            control.should_evaluate |= args.eval_strategy == "epoch" and (state.epoch or 0) >= args.eval_delay
            control.should_save |= args.save_strategy == "epoch"
            control.should_log |= args.logging_strategy == "epoch"
        if control.should_evaluate and not stage.final:
            control.should_evaluate = False

    def _finish(self, stage) -> None:
        if stage.index not in self._finished:
            self._finished.add(stage.index)
            self.trainer.stages_trained[stage.name] = stage.steps
            self.trainer.method.stage_finished(stage)

    def on_epoch_end(self, args, state, control, **kwargs):
        """The Trainer's epoch-end requests are dropped: the stages' own passes have asked already (`on_step_end`)."""
        control.should_evaluate = control.should_save = False
        if args.logging_strategy == "epoch":
            control.should_log = False

    def on_epoch_begin(self, args, state, control, **kwargs):
        """A training set whose random views are keyed by epoch (`AugmentedDataset`) learns which epoch starts:
        accelerate tells it only in a single process, and a resumed run starts inside an epoch."""
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(math.floor(state.epoch + 1e-9))

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.step_losses.clear()
        self.trainer.nonfinite.snapshot(self.trainer.distill_model)  # put back if this step is skipped
        stage = self.trainer.plan.stage_at(state.global_step)
        if stage.index == self._current:
            return
        self._current = stage.index
        for finished in self.trainer.plan.stages[:stage.index - 1]:  # a resumed run starts past them
            self._finish(finished)
        label = f"stage {stage.index}/{len(self.trainer.plan.stages)}: {stage.name}"
        if state.is_world_process_zero:
            logger.info(f"Starting {label} (steps {stage.start + 1}-{stage.end})")
        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, ProgressCallback) and cb.training_bar is not None:
                cb.training_bar.set_description(label)
