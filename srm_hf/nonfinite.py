"""Skipping optimizer steps whose gradient is NaN/inf, and stopping when too many come in a row."""

import math

from transformers.utils import logging

logger = logging.get_logger(__name__)


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0  # over the whole run, logged as `nonfinite_steps_skipped`

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
