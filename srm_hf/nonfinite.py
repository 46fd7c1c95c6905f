"""Skipping optimizer steps whose gradient is NaN/inf without a trace, and stopping when too many come in a row.

A forward pass writes BatchNorm running statistics before the gradient is known: `snapshot` copies every buffer
at the start of each optimizer step and `restore` puts them back when the step is skipped.
"""

import math

import torch
import torch.nn as nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0  # over the whole run, logged as `nonfinite_steps_skipped`
        self._buffers: list[torch.Tensor] | None = None
        self._backup: list[torch.Tensor] = []

    def snapshot(self, model: nn.Module) -> None:
        """Copy the model's buffers (BatchNorm statistics and counters), to put back if this step is skipped."""
        if self._buffers is None:
            self._buffers = list(model.buffers())
            self._backup = [b.detach().clone() for b in self._buffers]
        elif self._buffers:
            torch._foreach_copy_(self._backup, self._buffers)

    def restore(self) -> None:
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._backup)

    def step_is_finite(self, grad_norm: float, stage_name: str, step: int) -> bool:
        """Whether the step at `step` (1-based) may be taken; raises after `max_in_a_row` skipped steps in a row."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row > self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} optimizer steps in a row had NaN/inf gradients (stage '{stage_name}', step {step}). "
                "Lower the learning rate, use bf16 rather than fp16, or check the inputs for NaNs; the last "
                "checkpoint holds the weights from before."
            )
        logger.warning(f"Non-finite gradient at step {step} (stage '{stage_name}'): step skipped.")
        return False
