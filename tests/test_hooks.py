import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import hf_resnet, timm_resnet

from srm_hf import FeatureHooks, describe_taps, pair_taps
from srm_hf.hooks import dry_run, stage_taps, unwrap_model


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


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


def test_describe_taps():
    taps = describe_taps(timm_resnet(), torch.randn(2, 3, 32, 32), ["layer2", "global_pool"])
    assert (taps[0].channels, taps[0].spatial, taps[0].reduction) == (48, (4, 4), 8)
    assert (taps[1].channels, taps[1].spatial) == (96, ())
    assert "layer2: 48x4x4" in str(taps[0])


def test_automatic_taps_are_stage_outputs():
    taps, logits = dry_run(hf_resnet(), torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    paths = [t.path for t in stage_taps(taps, min_reduction=4)]
    assert paths == ["resnet.encoder.stages.0", "resnet.encoder.stages.1", "resnet.encoder.stages.2",
                     "resnet.encoder.stages.3", "classifier.0"]
    first = stage_taps(taps, min_reduction=2)[0]
    assert first.path.startswith("resnet.embedder") and first.reduction == 2


def test_pairing_by_spatial_size():
    x = torch.randn(2, 3, 32, 32)
    teacher = stage_taps(dry_run(timm_resnet(), x)[0], 4)
    student = stage_taps(dry_run(hf_resnet(), x)[0], 4)
    pairs = [(t.path, s.path) for t, s in pair_taps(teacher, student)]
    assert pairs == [("layer1", "resnet.encoder.stages.0"), ("layer2", "resnet.encoder.stages.1"),
                     ("layer3", "resnet.encoder.stages.2"), ("global_pool", "classifier.0")]


def test_no_matching_size_is_a_clear_error():
    teacher = stage_taps(dry_run(small_net(), torch.randn(1, 3, 6, 6))[0], 1)  # grids 6x6, 3x3
    student = [t for t in stage_taps(dry_run(hf_resnet(), torch.randn(1, 3, 64, 64))[0], 4) if t.spatial]
    with pytest.raises(ValueError, match="layer_pairs"):
        pair_taps([t for t in teacher if t.spatial], student)
