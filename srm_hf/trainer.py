"""`DistillationTrainer`: any distillation method inside `transformers.Trainer`.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig("out"),
                                  train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
    trainer.train()          # every stage of the method, in one loop (see `stages.py`)
    trainer.save_model()     # the student alone, loadable by timm / transformers

The method (`srm_hf.methods`) says what each stage trains and computes; this file is the Trainer glue: the teacher,
the stage plan, the optimizer's groups, logging, saving. Batches are dicts with `pixel_values`, `labels` and, when
the teacher wants other preprocessing, `teacher_pixel_values`.
"""

import torch
import torch.nn as nn
from accelerate.utils import TorchDynamoPlugin
from transformers import Trainer, default_data_collator
from transformers.trainer_utils import has_length

from .callbacks import StageCallback
from .config import DistillationConfig
from .distillation_model import DistillationModel
from .forward import compile_in_place, hook_guards, in_layout, input_dtype, model_logits
from .hooks import FeatureHooks, capturing
from .hub import HubMixin
from .logged_metrics import LoggedMetrics
from .losses import classification_loss
from .methods import Features, Method, resolve_method
from .nonfinite import NonFiniteGuard
from .optimizer import build_optimizer
from .label_checks import CheckedLabels
from .preflight import check_training
from .reference import StageSelection
from .resume import check_resume_plan, data_settings, resolve_resume, schedule_settings
from .stage_batches import check_loader_plan, stage_batch_loader
from .stages import StagePlan, check_stage_selection, resets_moments, stage_scheduler, stage_steps
from .teacher_placement import prepare_teacher
from .trainer_checkpoints import CheckpointOverrides
from .trainer_options import RefusedTrainerFeatures, check_stage_groups, check_trainer_arguments


class DistillationTrainer(RefusedTrainerFeatures, CheckpointOverrides, HubMixin, Trainer):
    def __init__(self, model: nn.Module | str | None = None, teacher_model: nn.Module | str | None = None,
                 args: DistillationConfig | None = None, method: Method | str | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), **kwargs):
        args = DistillationConfig() if args is None else args
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args is a {type(args).__name__}; DistillationTrainer needs a DistillationConfig.")
        if train_dataset is None:
            raise ValueError("DistillationTrainer needs a train_dataset: its first samples size the method's modules.")
        method = resolve_method(method, args)  # then checked with it, before it is built:
        check_trainer_arguments(args, method, optimizers, dict(kwargs, compute_metrics=compute_metrics,
                                                               train_dataset=train_dataset, eval_dataset=eval_dataset))
        collate = data_collator or default_data_collator
        distill_model, teacher = DistillationModel.from_models(model, teacher_model, method, train_dataset, args,
                                                               collate)
        if args.compile_student:
            distill_model.compile_student(args)
        self._distill_model = distill_model  # wrappers (DDP, FSDP, DeepSpeed, compile) keep this very object inside

        super().__init__(model=distill_model, args=args, data_collator=CheckedLabels(collate, distill_model.num_labels),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns batch means
        self.teacher = prepare_teacher(teacher, self.accelerator, self.args, deepspeed=self.is_deepspeed_enabled)
        self.teacher_dtype = input_dtype(self.teacher)  # its inputs are cast to it
        pairs = distill_model.pairs
        self.teacher_hooks = FeatureHooks(self.teacher, {p.key: p.teacher.path for p in pairs},
                                          armed=False) if pairs else None  # capturing in the trainer's steps alone
        if args.compile_teacher:
            compile_in_place(self.teacher, args)
        self.plan: StagePlan | None = None
        self.resuming: str | bool | None = None  # the checkpoint `train()` resumes from
        self.stages_done: set[str] = set()  # stages run on their own by `train_stages`, left out of later plans
        self.stages_trained: dict[str, int] = {}  # each stage run (train_stages too): its steps, for the card
        self.logged = LoggedMetrics()  # what `log_metric` adds to the next training log
        self.nonfinite = NonFiniteGuard(args.max_nonfinite_steps)
        self.step_losses: list[torch.Tensor] = []  # the current optimizer step's losses (one per micro-batch)
        for callback in [StageCallback(self)] + ([StageSelection(self)] if args.preset == "reference" else []):
            self.add_callback(callback)
        method.built = True  # only now: a construction that failed leaves the instance free for a retry

    @property
    def distill_model(self) -> DistillationModel:
        """The trained module (student + method), without the DDP / FSDP / DeepSpeed wrapper. Kept from `__init__`
        rather than unwrapped at each call: `accelerator.unwrap_model` does import lookups, and it ran every step."""
        return self._distill_model

    @property
    def method(self) -> Method:
        return self.distill_model.method

    @property
    def tap_pairs(self) -> list:
        return self.distill_model.pairs

    def teacher_forward(self, inputs: dict) -> Features:
        """The teacher's logits [N, num_labels] and tapped features keyed by pair key, in eval mode, no grad."""
        if self.teacher.training:  # `eval()` walks every module: only when user code has switched the teacher
            self.teacher.eval()
        pixels = inputs.get("teacher_pixel_values", inputs["pixel_values"])
        pixels = pixels if self.teacher_dtype is None else pixels.to(self.teacher_dtype)  # a bf16 teacher, say
        pixels = in_layout(pixels, self.distill_model.nhwc["teacher"])
        with torch.no_grad(), hook_guards(self.args.compile_teacher), capturing(self.teacher_hooks):
            logits = model_logits(self.teacher(pixels))
        return Features(logits, self.teacher_hooks.pop() if self.teacher_hooks else {})

    # ---- stages --------------------------------------------------------------------------------------------

    def set_initial_training_values(self, args, dataloader):
        """Size the method's stages from the dataloader's length; the run's length is the sum of the stages."""
        (num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples, total_train_batch_size,
         steps_in_epoch, max_steps) = super().set_initial_training_values(args, dataloader)
        per_epoch = num_update_steps_per_epoch if has_length(dataloader) else None
        if not args.stage_batch_sizes:  # else the loader planned the stages (`stage_batches.py`)
            specs = self.distill_model.stage_specs(skip=self.stages_done)
            self.plan = StagePlan([(spec, stage_steps(spec, per_epoch, max_steps)) for spec in specs])
            self.steps_per_epoch = {stage.name: per_epoch for stage in self.plan.stages}
        else:
            check_loader_plan(self, dataloader)
        if isinstance(self.resuming, str):  # the checkpoint's step placed on this plan
            check_resume_plan(self.resuming, self.plan.describe(), schedule_settings(self.args),
                              data_settings(self.args))
        max_steps = self.plan.total_steps
        if per_epoch is not None:
            num_train_epochs = -(-max_steps // per_epoch)
        num_train_samples = max_steps * total_train_batch_size
        return (num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples, total_train_batch_size,
                steps_in_epoch, max_steps)

    def get_train_dataloader(self):
        """With `stage_batch_sizes`, one loader whose batches change size at each stage (`stage_batches.py`)."""
        return stage_batch_loader(self) if self.args.stage_batch_sizes else super().get_train_dataloader()

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Every stage not yet run by `train_stages`, in order; resumes only from a complete checkpoint."""
        if getattr(self, "_owns_optimizer", False):  # a new plan needs a new optimizer ...
            self.optimizer = None
        if getattr(self, "_owns_scheduler", False):  # ... and a new schedule (also for an optimizer passed in)
            self.lr_scheduler = None
        self.resuming = resolve_resume(self.args.output_dir, resume_from_checkpoint)
        check_training(self)  # output folder, last batch: fail before any compute
        return super().train(self.resuming, trial, ignore_keys_for_eval, **kwargs)

    def train_stages(self, names: list[str], resume_from_checkpoint: str | bool | None = None):
        """Run only these stages of the method now (e.g. SRM's dictionary); a later `train()` leaves them out."""
        ran = self.stages_done | set(self.stages_trained)  # by train_stages, or by a whole train()
        known = check_stage_selection(self.method, names, ran, bool(resume_from_checkpoint))
        before, self.stages_done = self.stages_done, self.stages_done | (set(known) - set(names))
        try:
            output = self.train(resume_from_checkpoint)
        finally:
            self.stages_done = before
        self.stages_done = before | set(names)
        return output

    # ---- optimisation --------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """One optimizer, its groups tagged by what they hold: 'student' and each of the method's child modules."""
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(self.distill_model))  # student and method modules alike
            chosen = getattr(self, "optimizer_cls_and_kwargs", None)  # the Trainer's `optimizer_cls_and_kwargs`
            default = (lambda args, model: chosen) if chosen is not None else self.get_optimizer_cls_and_kwargs
            self.optimizer = build_optimizer(self.distill_model, self.args, decay, default, self.resuming)
            self._owns_optimizer = True
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            check_stage_groups(optimizer)
            self.lr_scheduler = stage_scheduler(optimizer, self.plan, self.args)
            self._owns_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        stage = self.plan.stage_at(self.state.global_step)
        if resets_moments(stage, self.plan, self.args):  # fresh moments for what the stage trains
            for group in self.optimizer.param_groups:
                if group["stage_group"] in stage.groups:
                    for p in group["params"]:
                        self.optimizer.state.pop(p, None)
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- loss and logging ----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        pixel_values = in_layout(inputs["pixel_values"], self.distill_model.nhwc["student"])
        if not model.training:  # evaluation: the student's classification loss
            outputs = model(pixel_values=pixel_values)
            loss = None if labels is None else classification_loss(outputs.logits, labels,
                                                                   self.args.label_smoothing_factor, training=False)
            return (loss, outputs) if return_outputs else loss
        self.logged.hold()  # the step's loss and terms wait for the NaN guard's decision (`_get_grad_norm`)
        stage = self.plan.stage_at(self.state.global_step)
        with capturing(self.teacher_hooks):  # also for a `teacher_forward` override that runs the teacher itself
            teacher = self.teacher_forward(inputs) if stage.spec.uses_teacher else None
        outputs = model(pixel_values=pixel_values, labels=labels, stage=stage, teacher=teacher)
        for name, value in outputs.terms.items():
            self.log_metric(f"{stage.name}/{name}", value)
        self.step_losses.append(outputs.loss.detach())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log_metric(self, name: str, value: torch.Tensor | float) -> None:
        """Add a value to the next training log under `name`, averaged over the steps since the last log."""
        self.logged.add(name, value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the logged metrics (averaged since the last log), the stage and its learning rate; eval logs: the
        stage."""
        step = max(self.state.global_step - 1, 0)  # the step just taken
        if self.plan is not None and any(k.endswith("_runtime") and not k.startswith("train") for k in logs):
            logs["stage"] = self.plan.stage_at(step).index
        if "loss" in logs and self.plan is not None:
            self.nonfinite.settle()  # every step's outcome counted before `nonfinite_steps_skipped` is logged
            logs.update(self.logged.pop_means(self.accelerator))  # the loss too (the Trainer's counts skipped steps)
            # unless a `compute_loss` override recorded no step losses: the Trainer's stays
            stage = self.plan.stage_at(step)
            logs["stage"] = stage.index
            logs["nonfinite_steps_skipped"] = self.nonfinite.skipped
            i = next(i for i, g in enumerate(self.optimizer.param_groups) if g["stage_group"] in stage.groups)
            logs["learning_rate"] = self.lr_scheduler.base_lrs[i] * self.lr_scheduler.lr_lambdas[i](step)
        super().log(logs, start_time)

    # ---- overrides of Trainer internals (underscore methods; tests/test_trainer_internals.py guards them; the ----
    # ---- checkpoint ones are in trainer_checkpoints.py) ------------------------------------------------------

    def _get_grad_norm(self, model, grad_norm=None):
        """Skip the optimizer step when the gradient is not finite (under fp16, the scaler skips it), buffers
        included, and with it the step's loss and terms in the logs."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        kept = True  # no norm: nothing to judge
        if grad_norm is not None:
            stage, optimizer = self.plan.stage_at(self.state.global_step), getattr(self.optimizer, "optimizer", None)
            kept = self.nonfinite.skip_if_nonfinite(grad_norm, optimizer or self.optimizer, model,  # the torch one
                                                    stage.name, self.state.global_step + 1,
                                                    scaled=self.accelerator.scaler is not None)
        if self.step_losses:  # the step's loss as the Trainer adds it up: its micro-batches' mean
            self.logged.add("loss", torch.stack(self.step_losses).mean())
        self.logged.end_step(kept)  # a skipped step's loss and terms drop out of the log's means
        return grad_norm

    def _build_accelerator_args(self, **kwargs) -> dict:
        """No whole-module compile by Accelerate: compile_student / compile_teacher compile each model in place (the
        config refuses the other ways to ask), and the backend / mode they use must not reach the dynamo plugin."""
        return {**super()._build_accelerator_args(**kwargs), "dynamo_plugin": TorchDynamoPlugin(backend="no")}
