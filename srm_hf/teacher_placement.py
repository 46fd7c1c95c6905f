"""Where the frozen teacher lives under each Accelerate engine (single device, DDP, FSDP, DeepSpeed ZeRO-2).

The teacher is never wrapped: every process holds it whole, in eval mode, on its own device. Only the student
(with its dictionaries and heads) goes through DDP, FSDP or DeepSpeed.
"""

import torch
import torch.nn as nn
from accelerate import Accelerator

from .config import DistillationConfig


def prepare_teacher(teacher: nn.Module, accelerator: Accelerator, args: DistillationConfig,
                    deepspeed: bool = False) -> nn.Module:
    """Frozen, in eval mode, on this process's device; under DeepSpeed also in the engine's precision."""
    teacher.requires_grad_(False)
    teacher.eval()
    if deepspeed:
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 would shard the teacher too, which DistillationTrainer does not support: use "
                "ZeRO-2 (recipes/accelerate_configs/deepspeed_zero2.yaml) or FSDP."
            )
        # DeepSpeed runs the student in its own precision and casts the inputs to it: the teacher follows.
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        return teacher.to(device=accelerator.device, dtype=dtype)
    # Accelerate leaves device placement to FSDP, which does not wrap an evaluation-only model; autocast comes
    # from prepare_model.
    return accelerator.prepare_model(teacher.to(accelerator.device), evaluation_mode=True)
