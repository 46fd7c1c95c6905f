"""Calling any image classifier: through its wrappers, for its logits, in eval mode.

timm models and plain modules return a logits tensor, transformers models a `ModelOutput` with `.logits`; DDP,
DataParallel and `torch.compile` wrap the module that owns the parameters and the hooks.
"""

from contextlib import contextmanager, nullcontext

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
    """Logits of any image classifier's output: a tensor (timm, plain modules), a `ModelOutput` or a dict with
    "logits" (wherever it stands), else the first tensor of a tuple or dict."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    return first_tensor(output)


def input_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters, which its inputs are cast to (e.g. a teacher loaded in
    bfloat16 beside a float32 student); None without any."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def to_channels_last(model: nn.Module) -> bool:
    """Put the model's 4-D weights in channels_last memory format, in place; False (and nothing done) for a model
    without any, whose images then stay NCHW (its first layer may flatten them with `.view`)."""
    if not any(p.dim() == 4 for p in model.parameters()):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def in_layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Images [N, C, H, W] in channels_last memory format when asked (no copy if they already are); else as given.
    A convolution whose input or weight is channels_last returns channels_last maps, so the whole model follows."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


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


def compile_in_place(model: nn.Module, args) -> None:
    """`torch.compile` a model in place (state-dict keys and hooks stay) with the run's torch_compile_backend (default
    inductor) and torch_compile_mode: `compile_student` and `compile_teacher`. Attach the hooks first."""
    model.compile(backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode)


def hook_guards(compiled: bool):
    """The context to call a model compiled in place whose submodules carry forward hooks (taps) in.

    By default Dynamo installs no guards on (empty) module hook dicts, so code compiled for one instance of a model
    class without hooks is reused for another instance with hooks, whose taps then capture nothing (e.g. a KD run,
    then an SRM run, in one process; pytorch/pytorch#117758). With the guards on, each is compiled for its hooks."""
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False) if compiled else nullcontext()


def runs_as_written(module: nn.Module, cls: type) -> bool:
    """Whether `module` is exactly `cls` with no forward hooks, so that a fused path reading its parameters directly
    computes what calling it would: a subclass, a hook or a wrapper (FSDP's) runs code of its own."""
    return type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)
