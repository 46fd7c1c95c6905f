"""`DistillationTrainer`: Sparse Representation Matching inside `transformers.Trainer`.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                  train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
    trainer.train()          # every stage of `args.mode`, in one loop (see `stages.py`)
    trainer.save_model()     # the student alone, loadable by timm / transformers

Batches are dicts with `pixel_values`, `labels` and, when the teacher wants other preprocessing,
`teacher_pixel_values`. Override `teacher_forward`, `compute_dictionary_loss`, `compute_srm_loss` or
`compute_kd_loss` to change a part of the method.
"""

import math
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, default_data_collator
from transformers.trainer_utils import has_length
from transformers.utils import logging

from .callbacks import StageCallback
from .checkpoint import (
    DICTIONARY_NAME,
    SRM_STATE_NAME,
    load_srm_state,
    load_student_weights,
    save_srm_state,
    save_student,
)
from .config import DistillationConfig
from .engines import prepare_teacher
from .hooks import FeatureHooks
from .hub import model_card_for, push_student
from .losses import at_loss, classification_loss, dictionary_loss, fitnet_loss, kd_loss, srm_loss
from .modeling import DistillationModel, student_logits, tap_key
from .models import load_image_classifier
from .stages import StagePlan, stage_scheduler, stage_steps
from .taps import plan_taps

logger = logging.get_logger(__name__)


class DistillationTrainer(Trainer):
    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        args = DistillationConfig() if args is None else args
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args is a {type(args).__name__}; DistillationTrainer needs a DistillationConfig.")
        if model is None:
            raise ValueError("Pass the student as `model=` (an nn.Module, or a Hub id / local path).")
        if kwargs.get("model_init") is not None:
            raise ValueError("model_init is not supported: pass the student as `model=`.")
        student = load_image_classifier(model) if isinstance(model, str) else model
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher is None:
            raise ValueError("No teacher: pass `teacher_model=` or set `teacher_model_name_or_path` in the config.")
        teacher = load_image_classifier(teacher) if isinstance(teacher, str) else teacher
        if train_dataset is None:
            raise ValueError("DistillationTrainer needs a train_dataset: its first samples size the SRM modules.")

        example = (data_collator or default_data_collator)([train_dataset[i] for i in range(min(2, len(train_dataset)))])
        pairs = plan_taps(teacher, student, example, args)
        distill_model = DistillationModel(student, pairs, args.codeword_multiplier, args.sparsity_multiplier,
                                          method=args.method)
        if args.compile_student:  # in place, after the taps are hooked: state_dict keys and hooks stay as they are
            student.compile(backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode)
        if args.dictionary_path:
            load_srm_state(distill_model, args.dictionary_path, prefix="coders.")

        super().__init__(
            model=distill_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self.loss_is_scaled_for_ga = False  # compute_loss returns batch means
        self.teacher = self._prepare_teacher(teacher)
        self.teacher_hooks = FeatureHooks(self.teacher, [p.teacher.path for p in pairs])
        self.tap_pairs = pairs
        self.plan: StagePlan | None = None
        self._dictionary_ready = args.dictionary_path is not None
        self._dictionary_only = False
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._nonfinite_in_a_row = 0
        self._nonfinite_skipped = 0
        self.add_callback(StageCallback(self))

    # ---- teacher -------------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Frozen, in eval mode, on this process's device, never wrapped (see `srm_hf.engines`)."""
        return prepare_teacher(teacher, self.accelerator, self.args, deepspeed=self.is_deepspeed_enabled)

    def teacher_forward(self, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher logits [N, num_labels] and tapped features keyed by tap, in eval mode under no_grad."""
        pixel_values = inputs.get("teacher_pixel_values", inputs["pixel_values"])
        self.teacher.eval()
        with torch.no_grad():
            logits = student_logits(self.teacher(pixel_values))
        return logits, {tap_key(path): f for path, f in self.teacher_hooks.pop().items()}

    # ---- stages --------------------------------------------------------------------------------------------

    def stage_names(self) -> list[str]:
        if self._dictionary_only:
            return ["dictionary"]
        names = self.args.stage_names
        return [n for n in names if n != "dictionary"] if self._dictionary_ready else names

    def set_initial_training_values(self, args, dataloader):
        """Build the stage plan from the dataloader's length; the run's length is the sum of the stages."""
        values = list(super().set_initial_training_values(args, dataloader))
        steps_per_epoch = values[1] if has_length(dataloader) else None
        lengths = {
            "dictionary": stage_steps(args.dictionary_epochs, args.dictionary_max_steps, steps_per_epoch, "dictionary"),
            "srm": stage_steps(args.srm_epochs, args.srm_max_steps, steps_per_epoch, "srm"),
            "hint": stage_steps(args.hint_epochs, args.hint_max_steps, steps_per_epoch, "hint"),
        }
        lengths.update({name: values[6] for name in ("kd", "joint", "at", "ce")})  # the last stage
        self.plan = StagePlan([(name, lengths[name]) for name in self.stage_names()])
        max_steps = self.plan.total_steps
        if steps_per_epoch is not None:
            values[0] = math.ceil(max_steps / steps_per_epoch)  # num_train_epochs
        values[3] = max_steps * values[4]  # num_train_samples
        values[6] = max_steps
        return tuple(values)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run every stage of `args.mode` in order (stage 1 is skipped once a dictionary is learnt or loaded)."""
        if getattr(self, "_owns_optimizer", False):  # a new plan needs a new optimizer and schedule
            self.optimizer, self.lr_scheduler = None, None
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def pretrain_dictionary(self, save_path: str | None = None):
        """Run stage 1 alone and save the dictionary (default `output_dir/srm_dictionary.safetensors`)."""
        if self.args.method != "srm":
            raise ValueError(f"method={self.args.method!r} learns no dictionary: pretrain_dictionary() is for 'srm'.")
        self._dictionary_only = True
        try:
            output = self.train()
        finally:
            self._dictionary_only = False
        self._dictionary_ready = True
        self.save_dictionary(save_path)
        return output

    def save_dictionary(self, path: str | None = None) -> str:
        path = path or os.path.join(self.args.output_dir, DICTIONARY_NAME)
        if self.args.should_save:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            coders = {k: v for k, v in self._distill_model.state_dict().items() if k.startswith("coders.")}
            save_srm_state(coders, path, self._tap_metadata())
        return path

    @property
    def _distill_model(self) -> DistillationModel:
        return self.accelerator.unwrap_model(self.model)

    def _tap_metadata(self) -> list[dict]:
        return [{"teacher": p.teacher.path, "student": p.student.path, "channels": p.teacher.channels}
                for p in self.tap_pairs]

    # ---- optimisation --------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """One optimizer, param groups tagged by what they hold: student, heads, dictionary."""
        if self.optimizer is None:
            distill_model = self._distill_model
            decay = set(self.get_decay_parameter_names(distill_model.student))
            named = [(n, p) for n, p in distill_model.student.named_parameters() if p.requires_grad]
            wd = self.args.weight_decay
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": wd, "srm_group": "student"},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0, "srm_group": "student"},
                {"params": list(distill_model.heads.parameters()), "weight_decay": wd, "srm_group": "heads"},
                {"params": list(distill_model.coders.parameters()), "weight_decay": 0.0,
                 "lr": self.args.dictionary_learning_rate, "srm_group": "dictionary"},
                {"params": list(distill_model.regressors.parameters()), "weight_decay": wd, "srm_group": "regressors"},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, distill_model)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
            self._owns_optimizer = True
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            if any("srm_group" not in g for g in optimizer.param_groups):
                raise ValueError(
                    "The optimizer's param groups lack the 'srm_group' tag ('student', 'heads' or 'dictionary') "
                    "that the stage schedule needs. Tag each group, or let DistillationTrainer build the optimizer."
                )
            self.lr_scheduler = stage_scheduler(optimizer, self.plan, self.args)
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        stage = self.plan.stage_at(self.state.global_step)
        if stage.start > 0 and self.state.global_step == stage.start:
            # A stage starts with fresh optimizer moments for what it trains, as separate runs would.
            for group in self.optimizer.param_groups:
                if group["srm_group"] in stage.groups:
                    for p in group["params"]:
                        self.optimizer.state.pop(p, None)
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_grad_norm(self, model, grad_norm=None):
        """Skip the optimizer step when the gradient is not finite (bf16/fp32; fp16's scaler skips on its own)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.accelerator.scaler is not None or grad_norm is None:
            return grad_norm
        if bool(torch.isfinite(torch.as_tensor(grad_norm))):
            self._nonfinite_in_a_row = 0
            return grad_norm
        self._nonfinite_in_a_row += 1
        self._nonfinite_skipped += 1
        stage = self.plan.stage_at(self.state.global_step)
        if self._nonfinite_in_a_row > self.args.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had NaN/inf gradients (stage '{stage.name}', "
                f"step {self.state.global_step + 1}). Lower the learning rate, use bf16 rather than fp16, or check the "
                "inputs for NaNs; the last checkpoint holds the weights from before."
            )
        logger.warning(f"Non-finite gradient at step {self.state.global_step + 1} (stage '{stage.name}'): step skipped.")
        for p in model.parameters():
            p.grad = None  # optimizers skip parameters without a gradient
        return grad_norm

    # ---- losses --------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if not model.training:  # evaluation: the student's classification loss
            outputs = model(pixel_values=inputs["pixel_values"])
            loss = classification_loss(outputs.logits, labels) if labels is not None else None
            return (loss, outputs) if return_outputs else loss

        stage = self.plan.stage_at(self.state.global_step)
        if stage.name == "ce":  # the student alone: no teacher
            outputs = model(pixel_values=inputs["pixel_values"])
            terms = {"ce": classification_loss(outputs.logits, labels)}
        elif stage.name == "dictionary":
            _, teacher_features = self.teacher_forward(inputs)
            outputs = model(teacher_features=teacher_features)
            terms = self.compute_dictionary_loss(teacher_features, outputs.reconstructions)
        else:
            teacher_logits, teacher_features = self.teacher_forward(inputs)
            with_heads = stage.name in ("srm", "joint")
            outputs = model(pixel_values=inputs["pixel_values"], with_heads=with_heads,
                            with_features=stage.name in ("hint", "at"))
            terms = {}
            if stage.name in ("kd", "joint", "at"):
                terms.update(self.compute_kd_loss(outputs.logits, teacher_logits, labels))
            if with_heads:
                targets = self._distill_model.targets(teacher_features)
                weight = self.args.srm_weight if stage.name == "joint" else 1.0
                terms.update({k: weight * v for k, v in self.compute_srm_loss(outputs.head_logits, targets).items()})
            if stage.name == "hint":
                terms["mse"] = sum(fitnet_loss(outputs.features[k], teacher_features[k]) for k in teacher_features)
            if stage.name == "at":
                terms["at"] = self.args.at_beta / 2 * sum(
                    (at_loss(outputs.features[k], teacher_features[k]) for k in teacher_features
                     if teacher_features[k].dim() > 2),  # attention needs a spatial map: pooled vectors are skipped
                    outputs.logits.new_zeros((), dtype=torch.float32),
                )
        loss = sum(terms.values())
        for name, value in terms.items():
            self._metrics[f"{stage.name}/{name}"].append(value.detach())
        return (loss, outputs) if return_outputs else loss

    def compute_dictionary_loss(self, features: dict, reconstructions: dict) -> dict[str, torch.Tensor]:
        """Stage 1: Σ_taps MSE(T, T̂)."""
        return {"mse": sum(dictionary_loss(features[k], reconstructions[k]) for k in features)}

    def compute_srm_loss(self, head_logits: dict, targets: dict) -> dict[str, torch.Tensor]:
        """Σ_taps [pixel CE + image BCE], weighted as configured. Returns {"pixel": ..., "image": ...}."""
        args = self.args
        pixel_weight = args.srm_pixel_weight if args.srm_targets in ("both", "pixel") else 0.0
        image_weight = args.srm_image_weight if args.srm_targets in ("both", "image") else 0.0
        total: dict[str, torch.Tensor] = {}
        for key, logits in head_logits.items():
            pixel_labels, image_labels = targets[key]
            # Recomputed in backward: keeps the K-channel sigmoid / softmax maps out of activation memory.
            terms = checkpoint(srm_loss, logits, pixel_labels, image_labels, pixel_weight, image_weight,
                               args.srm_pixel_ce_on_sigmoid, use_reentrant=False)
            for name, value in terms.items():
                total[name] = total[name] + value if name in total else value
        return total

    def compute_kd_loss(self, student_logits, teacher_logits, labels) -> dict[str, torch.Tensor]:
        """Hinton KD: α·T²·KL(teacher ‖ student) + (1-α)·CE(student, labels); KD alone when there are no labels."""
        alpha, temperature = self.args.kd_alpha, self.args.kd_temperature
        if labels is None:
            return {"kd": kd_loss(student_logits, teacher_logits, temperature)}
        return {
            "kd": alpha * kd_loss(student_logits, teacher_logits, temperature),
            "ce": (1 - alpha) * classification_loss(student_logits, labels),
        }

    # ---- logging -------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each loss term (averaged since the last log) and the stage to the training logs."""
        if "loss" in logs and self.plan is not None:
            for name, values in self._metrics.items():
                logs[name] = self.accelerator.reduce(torch.stack(values).mean(), "mean").item()
            self._metrics.clear()
            step = max(self.state.global_step - 1, 0)  # the step just taken
            stage = self.plan.stage_at(step)
            logs["stage"] = stage.index
            logs["nonfinite_steps_skipped"] = self._nonfinite_skipped
            i = next(i for i, g in enumerate(self.optimizer.param_groups) if g["srm_group"] in stage.groups)
            logs["learning_rate"] = self.lr_scheduler.base_lrs[i] * self.lr_scheduler.lr_lambdas[i](step)
        super().log(logs, start_time)

    # ---- saving and loading --------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student alone in its library's format, and the SRM modules beside it in `srm_state.safetensors`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        distill_model = self._distill_model
        state_dict = distill_model.state_dict() if state_dict is None else state_dict
        student_state = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        srm_state = {k: v for k, v in state_dict.items() if not k.startswith("student.")}
        save_student(distill_model.student, output_dir, student_state)
        save_srm_state(srm_state, os.path.join(output_dir, SRM_STATE_NAME), self._tap_metadata())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        distill_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_weights(distill_model.student, resume_from_checkpoint)
        load_srm_state(distill_model, os.path.join(resume_from_checkpoint, SRM_STATE_NAME))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ---- Hub -----------------------------------------------------------------------------------------------

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No network at construction: the repo is created when the student is pushed."""
        self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints hold SRM state and optimizer files: only the final student is published (`push_to_hub`)."""

    def create_model_card(self, **kwargs) -> str:
        """Write README.md for the student into `output_dir`; kwargs: model_name, dataset, teacher,
        teacher_revision, student, metrics (see `srm_hf.hub.model_card_for`)."""
        card = model_card_for(self, **kwargs)
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "README.md"), "w") as f:
                f.write(card)
        return card

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Publish the student alone (its library's files and the model card) to `args.hub_model_id`."""
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        return push_student(
            self.args.output_dir, self.args.hub_model_id or self.hub_model_id,
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message or "Upload distilled student",
        )

