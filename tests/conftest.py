"""Tiny in-process models and data: no Hub, no downloads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

if not torch.cuda.is_available():  # the Triton kernels (srm_hf.fused) run on the CPU, slowly, for tiny shapes;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before anything imports triton (timm does)

import pytest  # noqa: E402
import timm  # noqa: E402
import torch.nn as nn  # noqa: E402
from transformers import ResNetConfig, ResNetForImageClassification  # noqa: E402

from srm_hf import DistillationConfig  # noqa: E402

NUM_LABELS = 4
IMAGE_SIZE = 32
HANG_GUARD_S = 3 * 3600  # subprocesses' time limit: only a hung one reaches it, not a slow one on a busy machine


class PatternDataset(torch.utils.data.Dataset):
    """Images whose class sets a fixed random pattern, plus noise: learnable in a few steps."""

    def __init__(self, n: int = 32, seed: int = 0, channels: int = 3, size: int = IMAGE_SIZE):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(NUM_LABELS, channels, size, size, generator=torch.Generator().manual_seed(123))
        self.labels = torch.arange(n) % NUM_LABELS
        self.images = patterns[self.labels] + 0.5 * torch.randn(n, channels, size, size, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def small_net():
    """Conv 8x8 -> conv 4x4 -> pooled vector -> 2 logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def timm_resnet(seed: int = 0, num_classes: int = NUM_LABELS):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


def hf_resnet(seed: int = 0, num_labels: int = NUM_LABELS, hidden_sizes=(8, 16, 24, 32)):
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=list(hidden_sizes), depths=[1, 1, 1, 1],
        num_labels=num_labels, layer_type="basic",
    )
    return ResNetForImageClassification(config)


def parallelism_config():
    """accelerate's `ParallelismConfig()`, or None before accelerate 1.10 (which has no such option to set)."""
    try:
        from accelerate import ParallelismConfig
    except ImportError:
        return None
    return ParallelismConfig()


def make_config(tmp_path, **kwargs) -> DistillationConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if kwargs.get("method", "srm") == "srm":  # 4 + 4 + 4 steps (paper) or 4 + 4 (joint)
        defaults.update(srm_dictionary_max_steps=4, srm_max_steps=4)
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


@pytest.fixture
def ieee_float32(request):
    """IEEE float32 in torch's cuDNN convolutions and matmuls for the test's duration, unless it is marked
    `own_float32_settings`. On a GPU cuDNN convolves float32 in TF32 by default, and TF32 rounds differently in cuDNN
    and in a kernel's dot, by far more than the 1e-5 at which the fused tests compare the kernels with the eager maths
    (on the CPU both are IEEE already)."""
    from fused_helpers import fp32_precision

    if request.node.get_closest_marker("own_float32_settings"):
        yield
        return
    with fp32_precision("ieee", "ieee"):
        yield


@pytest.fixture
def dataset():
    return PatternDataset(32)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, prefix: str = "") -> bool:
    """Whether any float entry under `prefix` differs."""
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix) and before[k].is_floating_point())


def pretrain_dictionary(trainer) -> str:
    """SRM's stage 1 alone, its dictionary saved to output_dir/srm_dictionary.safetensors (the public two steps)."""
    import os

    from srm_hf.methods.srm import DICTIONARY_NAME

    trainer.train_stages(["dictionary"])
    return trainer.method.save_dictionary(os.path.join(trainer.args.output_dir, DICTIONARY_NAME))


def make_trainer(tmp_path, teacher=None, student=None, train_dataset=None, callbacks=None, cls=None,
                 optimizers=(None, None), **config):
    from srm_hf import DistillationTrainer

    return (cls or DistillationTrainer)(
        model=student if student is not None else hf_resnet(),
        teacher_model=teacher if teacher is not None else timm_resnet(),
        args=make_config(tmp_path, **config),
        train_dataset=train_dataset if train_dataset is not None else PatternDataset(32),
        eval_dataset=PatternDataset(16, seed=1),
        callbacks=callbacks,
        optimizers=optimizers,
    )


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Replaces HfApi's create_repo / upload_* with local copies; returns the 'remote' repos."""
    import shutil
    from concurrent.futures import Future

    from huggingface_hub import HfApi

    repos = {}

    def create_repo(self, repo_id, **kwargs):
        repos.setdefault(repo_id, tmp_path / "hub" / repo_id.replace("/", "--"))
        repos[repo_id].mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, run_as_future=False, commit_message=None, **kwargs):
        shutil.copytree(folder_path, repos[repo_id], dirs_exist_ok=True)
        repos.setdefault("commits", []).append((repo_id, commit_message, sorted(os.listdir(folder_path))))
        if not run_as_future:
            return "commit"
        future = Future()
        future.set_result("commit")
        return future

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        shutil.copy(path_or_fileobj, repos[repo_id] / path_in_repo)
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    return repos
