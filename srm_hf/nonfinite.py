"""Skipping optimizer steps whose gradient is NaN/inf without a trace, and stopping when too many come in a row.

A forward pass writes BatchNorm running statistics before the gradient is known: `snapshot` copies every buffer
at the start of each optimizer step, and a skipped step gets them back.

Three ways to skip, chosen per step by `skip_if_nonfinite`:
- on the device, without the host waiting for the gradient norm, for torch's fused Adam, AdamW and Adagrad (the
  Trainer's default `adamw_torch_fused`), whose step takes a `found_inf` tensor and then leaves parameters and
  state as they were, with every parameter on the norm's device: the buffers are selected on the device, and the
  outcome is read one step later on CUDA (counted, warned about and checked at the same step on every rank), at
  once on the CPU, and at every log and at the end of training;
- under fp16's gradient scaler, which skips the optimizer step itself: the buffers are selected on the device and
  the outcome is counted as above;
- on the host otherwise: the norm is read, and a skipped step drops the gradients and puts the buffers back.
Each tells whether the step is kept (on the device, as a flag), so that a skipped step's loss and terms drop out of
the training logs (`logged_metrics.py`).
"""

import math

import torch
import torch.nn as nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


# fused SGD is left out: a first step skipped leaves its momentum buffers uninitialised
SKIPS_ON_DEVICE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)


def skips_on_device(optimizer: torch.optim.Optimizer, grad_norm) -> bool:
    """Whether `optimizer` can skip a step by itself from a device flag, as `torch.amp.GradScaler` has it do: a
    fused torch Adam/AdamW/Adagrad (`_step_supports_amp_scaling`) whose parameters are all on `grad_norm`'s device
    (a plain tensor, not a DTensor)."""
    return (type(grad_norm) is torch.Tensor and grad_norm.device.type in ("cpu", "cuda")
            and isinstance(optimizer, SKIPS_ON_DEVICE) and getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(p.device == grad_norm.device for g in optimizer.param_groups for p in g["params"]))


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0  # over the whole run, logged as `nonfinite_steps_skipped`
        self._groups: list[tuple[list[torch.Tensor], torch.Tensor]] | None = None  # buffers of one dtype and device
        self._optimizer = None  # the optimizer last judged, and whether it skips on the device
        self._on_device = False
        self._pending = None  # the last step's (flag in pinned memory, event, stage name, step) on CUDA

    def snapshot(self, model: nn.Module) -> None:
        """Copy the model's buffers (BatchNorm statistics and counters), to put back if this step is skipped: one
        flat copy per dtype and device."""
        if self._groups is None:
            groups: dict[tuple, list[torch.Tensor]] = {}
            for b in model.buffers():
                groups.setdefault((b.dtype, b.device), []).append(b)
            self._groups = [(bufs, torch.cat([b.detach().reshape(-1) for b in bufs])) for bufs in groups.values()]
        else:
            for bufs, backup in self._groups:
                torch.cat([b.detach().reshape(-1) for b in bufs], out=backup)

    def skip_if_nonfinite(self, grad_norm, optimizer, model: nn.Module, stage_name: str, step: int,
                          scaled: bool = False) -> bool | torch.Tensor:
        """Make the optimizer step at `step` (1-based) a no-op, buffers included, if `grad_norm` is not finite.
        `scaled`: a gradient scaler steps the optimizer, and skips the step itself when `grad_norm` is not finite.
        Returns whether the step is kept: a bool, or a boolean tensor on the device where the host does not read it."""
        if optimizer is not self._optimizer:
            self._optimizer, self._on_device = optimizer, skips_on_device(optimizer, grad_norm)
        if scaled or self._on_device:
            finite = torch.isfinite(torch.as_tensor(grad_norm))
            self._put_back(finite)  # first: if `_watch` raises, the model in memory is as before the bad steps
            self._watch(finite, stage_name, step)  # may raise for an earlier step: before found_inf is set
            if not scaled:
                optimizer.found_inf = (~finite).float()  # read by the optimizer's step, removed by `step_done`
            return finite
        finite = math.isfinite(float(grad_norm))  # the host waits for the norm
        if not finite:
            self._put_back(None)
            for p in model.parameters():
                p.grad = None  # optimizers skip parameters without a gradient
        return self._count(finite, stage_name, step)

    def step_done(self) -> None:
        """After the optimizer step: its `found_inf` goes, so that no later step reads it."""
        if hasattr(self._optimizer, "found_inf"):
            del self._optimizer.found_inf

    def settle(self) -> None:
        """Count the last step's outcome, waiting for the device if it is pending (before a log, at the end)."""
        if self._pending is not None:
            (flag, event, stage_name, step), self._pending = self._pending, None
            event.synchronize()
            self._count(bool(flag.numpy()), stage_name, step)  # pinned host memory: no further wait

    def start(self, counts: dict | None = None) -> None:
        """At the start of training: the counts a resumed checkpoint recorded (`counts()`), else none; an outcome
        left pending by an interrupted run is not this run's."""
        counts = counts or {}
        self.skipped, self.in_a_row = counts.get("skipped", 0), counts.get("in_a_row", 0)
        self._pending = None

    def counts(self) -> dict:
        """What a checkpoint records, every step's outcome counted."""
        self.settle()
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    # ---- internals --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _put_back(self, finite: torch.Tensor | None) -> None:
        """The snapshot back into the buffers: always (`finite` None), or where the step is not finite, selected on
        the device (NaN-safe)."""
        for bufs, backup in self._groups or []:
            kept = backup if finite is None else torch.where(finite.to(backup.device),
                                                             torch.cat([b.reshape(-1) for b in bufs]), backup)
            torch._foreach_copy_(bufs, [v.view_as(b) for v, b in zip(kept.split([b.numel() for b in bufs]), bufs)])

    def _watch(self, finite: torch.Tensor, stage_name: str, step: int) -> None:
        """Count the previous step's outcome (on CUDA, long computed by now: the device is still busy with this
        step's queued work), then keep this step's flag as a pinned copy and an event; on the CPU, count it now."""
        self.settle()
        if finite.device.type != "cuda":
            self._count(bool(finite.numpy()), stage_name, step)  # host memory: no dispatcher call
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(finite.device))
        self._pending = (host, event, stage_name, step)

    def _count(self, finite: bool, stage_name: str, step: int) -> bool:
        """Record one step's outcome; raises after `max_in_a_row` skipped steps in a row."""
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row > self.max_in_a_row:
            self._pending = None
            raise FloatingPointError(
                f"{self.in_a_row} optimizer steps in a row had NaN/inf gradients (stage '{stage_name}', step {step}). "
                "Lower the learning rate, use bf16 rather than fp16, or check the inputs for NaNs. The model in "
                "memory is as it was before these steps (trainer.save_model() saves it), as is the last checkpoint."
            )
        logger.warning(f"Non-finite gradient at step {step} (stage '{stage_name}'): step skipped.")
        return False
