"""The Trainer's checkpoint internals as `DistillationTrainer` overrides them (private methods of
`transformers.Trainer`: tests/test_trainer_internals.py guards their signatures).

    _save                   the student alone, in its library's format, and the method's modules beside it
    _save_checkpoint        the Trainer's checkpoint, then its completion marker, then the rotation of older ones
    _load_from_checkpoint   the student and the method's modules back from a checkpoint (`_load_best_model` too)
"""

import os

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoint import load_distillation_model, save_distillation_model
from .resume import data_settings, mark_complete, schedule_settings


class CheckpointOverrides:
    """Mixed into `DistillationTrainer`, before `transformers.Trainer`."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student alone in its library's format, and the method's modules beside it (`srm_hf.checkpoint`)."""
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_distillation_model(self.distill_model, output_dir, state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, marked complete once every process has written its files (each writes its own
        RNG state), and only then are older checkpoints rotated out. The Trainer rotates before `on_save`: a stop
        between the two left `save_total_limit` checkpoints, none of them complete."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # the Trainer's rotation, deferred
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            step = self.state.global_step
            folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            torch.save(self.args, os.path.join(folder, "training_args.bin"))  # the run's limit, not the deferral
            mark_complete(folder, step, model_only=self.args.save_only_model, plan=self.plan.describe(),
                          nonfinite=self.nonfinite.counts(), settings=schedule_settings(self.args),
                          data=data_settings(self.args))
            rotate_checkpoints(self.args.output_dir, limit, self.state.best_model_checkpoint, use_mtime=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_distillation_model(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:  # the Trainer's own loads `model.safetensors` into the wrapper
        self._load_from_checkpoint(self.state.best_model_checkpoint)
