"""Gradient accumulation gives the update of the larger batch, in every stage (losses are batch means)."""

import torch
import torch.nn as nn
from conftest import NUM_LABELS, make_trainer


class NormFreeNet(nn.Module):
    """No BatchNorm, so a batch split in micro-batches computes exactly the same function."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, NUM_LABELS)

    def forward(self, x):
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))))


def run(tmp_path, mode, batch, accumulation):
    trainer = make_trainer(tmp_path, teacher=NormFreeNet(16, 0), student=NormFreeNet(8, 1), srm_mode=mode,
                           per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                           srm_dictionary_max_steps=2, srm_max_steps=2, max_steps=2, learning_rate=0.1,
                           optim="sgd")  # SGD: the update is proportional to the gradient, so mis-scaling shows
    trainer.train()
    return trainer


def test_accumulation_matches_the_larger_batch(tmp_path):
    for mode in ("paper", "joint"):
        big = run(tmp_path / f"{mode}-big", mode, batch=16, accumulation=1)
        small = run(tmp_path / f"{mode}-small", mode, batch=8, accumulation=2)
        a, b = big.distill_model.state_dict(), small.distill_model.state_dict()
        assert any(k.startswith("method.heads.") for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{mode}: {k}")
        losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
        for x, y in zip(losses(big), losses(small)):
            assert abs(x - y) < 1e-4 * max(1.0, abs(x))
