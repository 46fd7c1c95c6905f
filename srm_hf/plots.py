"""The end-of-run picture: loss curves per term and stage, and how the teacher uses its atoms per tap."""

import math

import numpy as np
import torch

from .forward import on_device


@torch.no_grad()
def atom_usage(trainer, dataset, max_batches: int = 8) -> dict[str, np.ndarray]:
    """Per tap: the share of pixels in which each atom is among the k kept ones, over a few batches (methods with
    SRM dictionaries; {} for the others)."""
    coders = getattr(trainer.method, "coders", None)
    if not coders:
        return {}
    loader = trainer.get_eval_dataloader(dataset)
    counts: dict[str, torch.Tensor] = {}
    pixels: dict[str, int] = {}
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        for key, feature in trainer.teacher_forward(on_device(batch, trainer.args.device)).features.items():
            codes = coders[key].encode(feature.float())  # K channels, layout of the feature
            active = (codes > 0).float()
            active = active.movedim(1, -1) if active.dim() == 4 else active  # [..., K]
            flat = active.reshape(-1, active.shape[-1])  # [pixels, K]
            counts[key] = counts.get(key, 0) + flat.sum(0).cpu()
            pixels[key] = pixels.get(key, 0) + flat.shape[0]
    return {k: (counts[k] / pixels[k]).numpy() for k in counts}


def loss_curves(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Every logged `stage/term` series: {name: (steps, values)}."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        for name, value in entry.items():
            if "/" in name and isinstance(value, (int, float)):
                steps, values = curves.setdefault(name, ([], []))
                steps.append(entry["step"])
                values.append(value)
    return curves


def save_report(path: str, log_history: list[dict], usage: dict[str, np.ndarray], title: str = "") -> str:
    """A PNG with one panel per stage (its loss terms against the step) and one per tap (sorted atom usage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(log_history)
    stages = list(dict.fromkeys(name.split("/")[0] for name in curves))
    panels = len(stages) + len(usage)
    cols = min(3, max(panels, 1))
    rows = math.ceil(max(panels, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, stage in zip(axes, stages):
        for name, (steps, values) in curves.items():
            if name.startswith(stage + "/"):
                ax.plot(steps, values, label=name.split("/", 1)[1])
        ax.set_title(f"stage: {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    for ax, (tap, share) in zip(axes[len(stages):], usage.items()):
        order = np.sort(share)[::-1]
        ax.bar(np.arange(len(order)), order, width=1.0)
        used = int((share > 0).sum())
        ax.set_title(f"teacher atoms at {tap}: {used}/{len(share)} used", fontsize=9)
        ax.set_xlabel("atom (sorted)")
        ax.set_ylabel("share of pixels active")
    for ax in axes[panels:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
