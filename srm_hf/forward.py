"""Calling any image classifier: through its wrappers, for its logits, in eval mode.

timm models and plain modules return a logits tensor, transformers models a `ModelOutput` with `.logits`; DDP,
DataParallel and `torch.compile` wrap the module that owns the parameters and the hooks.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def first_tensor(output) -> torch.Tensor | None:
    """The tensor a module returned, or the first tensor of a tuple / `ModelOutput`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def model_logits(output) -> torch.Tensor:
    """Logits of any image classifier's output: a tensor (timm, plain modules) or a `ModelOutput`."""
    if hasattr(output, "logits"):
        return output.logits
    return first_tensor(output)


def on_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (other entries dropped)."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


@contextmanager
def eval_mode(model: nn.Module):
    """Run `model` in eval mode under no_grad, then put its training flag back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
