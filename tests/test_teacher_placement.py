"""The teacher's placement under DeepSpeed, checked without DeepSpeed (a stand-in for the accelerator's state)."""

from types import SimpleNamespace

import pytest
import torch
from conftest import timm_resnet

from srm_hf.teacher_placement import prepare_teacher


def deepspeed_accelerator(stage: int):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)),
                           device=torch.device("cpu"))


@pytest.mark.parametrize("flags, dtype", [({"bf16": True}, torch.bfloat16), ({"fp16": True}, torch.float16),
                                          ({}, torch.float32)])
def test_under_deepspeed_the_teacher_takes_the_engines_precision_frozen(flags, dtype):
    args = SimpleNamespace(**{"bf16": False, "fp16": False, **flags})
    teacher = prepare_teacher(timm_resnet().train(), deepspeed_accelerator(2), args, deepspeed=True)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in teacher.parameters())


def test_zero3_is_refused_with_the_alternatives():
    args = SimpleNamespace(bf16=True, fp16=False)
    with pytest.raises(NotImplementedError, match="ZeRO-3.*ZeRO-2.*FSDP"):
        prepare_teacher(timm_resnet(), deepspeed_accelerator(3), args, deepspeed=True)
