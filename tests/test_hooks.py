import copy
import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import small_net, timm_resnet

from srm_hf import FeatureHooks
from srm_hf.forward import unwrap_model


def test_captures_module_outputs_and_clears_on_read():
    model = small_net()
    hooks = FeatureHooks(model, ["0", "2"])
    x = torch.randn(2, 3, 8, 8)
    model(x)
    feats = hooks.pop()
    torch.testing.assert_close(feats["0"], model[0](x))
    assert feats["2"].shape == (2, 6, 4, 4)
    with pytest.raises(RuntimeError, match="captured no tensor"):
        hooks.pop()  # cleared on read: nothing until the next forward
    hooks.remove()
    model(x)
    assert hooks._features == {}


def test_disarmed_hooks_capture_only_inside_capturing_and_the_model_still_pickles():
    model = small_net()
    hooks = FeatureHooks(model, ["2"], armed=False)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    assert hooks._features == {}  # plain inference keeps no activations
    with hooks.capturing():
        model(x)
    assert hooks.pop()["2"].shape == (2, 6, 4, 4) and not hooks.armed
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a closure as hook would not pickle
    copy.deepcopy(model)(x)
    assert hooks._features == {}


def test_a_trained_student_runs_untouched_by_its_trainer_outside_its_steps(tmp_path):
    from conftest import make_trainer

    trainer = make_trainer(tmp_path, srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=1)
    trainer.train()
    student, teacher = trainer.distill_model.student, trainer.teacher
    with torch.enable_grad():
        student(torch.randn(2, 3, 32, 32))
    teacher(torch.randn(2, 3, 32, 32))
    assert trainer.distill_model.student_hooks._features == {} and trainer.teacher_hooks._features == {}
    torch.save(student, io.BytesIO())
    trainer.train()  # and the trainer's own steps still capture


def test_unknown_path_lists_closest_names():
    model = timm_resnet()
    with pytest.raises(ValueError) as err:
        FeatureHooks(model, ["layer_3"])
    assert "layer_3" in str(err.value) and "'layer3'" in str(err.value)


def test_hooks_capture_through_torch_compile():
    model = small_net()
    hooks = FeatureHooks(model, ["2"])  # attached before compiling
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 8, 8)
    compiled(x)
    torch.testing.assert_close(hooks.pop()["2"], model[2](model[1](model[0](x))))
    assert unwrap_model(compiled) is model


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_hooks_capture_through_ddp(process_group):
    model = small_net()
    ddp = nn.parallel.DistributedDataParallel(model)
    hooks = FeatureHooks(ddp, ["2"])  # resolved on the unwrapped module
    ddp(torch.randn(2, 3, 8, 8)).sum().backward()
    assert hooks.pop()["2"].shape == (2, 6, 4, 4)
    assert model[0].weight.grad is not None


def test_features_come_back_under_the_callers_keys():
    model = small_net()
    hooks = FeatureHooks(model, {"a": "2", "b": "2", "c": "0"})  # one module under two keys: one hook
    assert len(hooks._handles) == 2
    model(torch.randn(2, 3, 8, 8))
    feats = hooks.pop()
    assert list(feats) == ["a", "b", "c"] and feats["a"] is feats["b"] and feats["c"].shape == (2, 4, 8, 8)


def test_a_tap_whose_output_is_changed_in_place_later_is_refused():
    """timm's BasicBlock adds the shortcut to bn2's output in place, then applies an in-place ReLU: a hook on bn2
    would hand over the block's output instead of the BatchNorm's."""
    model = timm_resnet().eval()
    hooks = FeatureHooks(model, ["layer1.0.bn2", "layer1.0"])
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match=r"\['layer1.0.bn2'\] were changed in place later in the forward pass"):
        hooks.pop()
    hooks.remove()
    hooks = FeatureHooks(model, ["layer1.0"])  # the block's own output is final
    model(torch.randn(2, 3, 32, 32))
    assert hooks.pop()["layer1.0"].min() >= 0  # after its ReLU
