"""Forward hooks by module path, tap descriptions and automatic teacher/student pairing.

    hooks = FeatureHooks(model, ["layer2", "layer3"])
    model(x)
    features = hooks.pop()        # {"layer2": [N, C, H, W], "layer3": ...}; the store is cleared

Hooks are attached to the unwrapped model (DDP's `.module`, `torch.compile`'s `._orig_mod`), so they capture
whichever wrapper runs the forward. Attach them before compiling.
"""

import difflib
from dataclasses import dataclass

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


def get_module(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)` with an error that lists the closest existing module names."""
    model = unwrap_model(model)
    names = [name for name, _ in model.named_modules() if name]
    if path in names:
        return model.get_submodule(path)
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4) or names[-5:]
    raise ValueError(
        f"No module named {path!r} in {type(model).__name__}. Closest module names: {close}. "
        "Use a path from `model.named_modules()` (or `describe_taps`), or let srm_hf pair layers automatically."
    )


class FeatureHooks:
    """Captures the outputs of the modules at `paths`; `pop()` returns them (a 1x1 map as the pooled vector
    [N, C] it is) and clears the store."""

    def __init__(self, model: nn.Module, paths: list[str]):
        self.paths = list(paths)
        self._features: dict[str, torch.Tensor] = {}
        self._handles = [get_module(model, p).register_forward_hook(self._hook(p)) for p in self.paths]

    def _hook(self, path: str):
        def hook(module, args, output):
            self._features[path] = first_tensor(output)

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The captured features, in `paths` order. Raises if a tap did not run in the last forward."""
        missing = [p for p in self.paths if self._features.get(p) is None]
        if missing:
            self._features.clear()
            raise RuntimeError(
                f"Taps {missing} captured no tensor in the last forward pass. Check that these modules run in the "
                "model's forward and return a tensor, or tap other modules."
            )
        features = {p: as_vector_if_pooled(self._features[p]) for p in self.paths}
        self._features.clear()
        return features

    def clear(self) -> None:
        self._features.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._features.clear()


@dataclass(frozen=True)
class TapInfo:
    """One tap as a dry-run forward sees it (timm vocabulary: module path, channels, reduction)."""

    path: str
    channels: int
    spatial: tuple[int, ...]  # (H, W) for maps, (L,) for tokens, () for pooled vectors
    reduction: float  # input height / tap height for maps; 0 otherwise

    @property
    def num_pixels(self) -> int:
        n = 1
        for s in self.spatial:
            n *= s
        return n

    def __str__(self) -> str:
        if len(self.spatial) == 2:
            shape = f"{self.channels}x{self.spatial[0]}x{self.spatial[1]} (reduction {self.reduction:g})"
        elif self.spatial:
            shape = f"{self.spatial[0]} tokens x {self.channels}"
        else:
            shape = f"{self.channels} (pooled vector)"
        return f"{self.path}: {shape}"


def as_vector_if_pooled(feature: torch.Tensor) -> torch.Tensor:
    """[N, C, 1, 1] -> [N, C]: a 1x1 map is a pooled vector (see `tap_info`), on both sides of a pair."""
    return feature.flatten(1) if feature.dim() == 4 and feature.shape[2:] == (1, 1) else feature


def tap_info(path: str, feature: torch.Tensor, input_height: int) -> TapInfo:
    if feature.dim() == 4 and feature.shape[2:] == (1, 1):
        return TapInfo(path, feature.shape[1], (), 0.0)  # [N, C, 1, 1] is a pooled vector
    if feature.dim() == 4:
        h, w = feature.shape[2:]
        return TapInfo(path, feature.shape[1], (h, w), input_height / h)
    if feature.dim() == 3:
        return TapInfo(path, feature.shape[2], (feature.shape[1],), 0.0)
    if feature.dim() == 2:
        return TapInfo(path, feature.shape[1], (), 0.0)
    raise ValueError(f"Tap {path!r} returned a tensor of shape {tuple(feature.shape)}, not a feature map.")


@torch.no_grad()
def dry_run(model: nn.Module, pixel_values: torch.Tensor) -> tuple[list[TapInfo], torch.Tensor]:
    """One eval-mode forward that records every module's output.

    Returns the candidate taps in execution order, one per distinct output tensor (named by the outermost module
    that returned it as a plain tensor), and the model's logits. Modules that return the logits are not taps.
    """
    model = unwrap_model(model)
    records: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: records.append((name, out)))
        for name, m in model.named_modules()
        if name
    ]
    was_training = model.training
    model.eval()
    try:
        logits = model_logits(model(pixel_values))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    taps: dict[int, TapInfo] = {}  # keyed by tensor identity; later (outer) modules overwrite inner ones
    for name, out in records:
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.dim() > 4 or out.shape[0] != logits.shape[0]:
            continue
        if out.data_ptr() == logits.data_ptr() or not out.is_floating_point():
            continue
        if out.dim() == 4 and not _same_aspect(out.shape[2:], pixel_values.shape[2:]):
            continue  # not a [N, C, H, W] map of this image (e.g. NHWC or attention scores)
        taps[id(out)] = tap_info(name, out, pixel_values.shape[-2])
    order = {id(out): i for i, (_, out) in enumerate(records) if id(out) in taps}
    return [taps[k] for k in sorted(taps, key=lambda k: order[k])], logits


def _same_aspect(size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    h, w = size
    return (h, w) == (1, 1) or abs(w - h * image_size[1] / image_size[0]) <= 1


def model_logits(output) -> torch.Tensor:
    """Logits of any image classifier's output: a tensor (timm, plain modules) or a `ModelOutput`."""
    if hasattr(output, "logits"):
        return output.logits
    return first_tensor(output)


def describe_taps(model: nn.Module, pixel_values: torch.Tensor, paths: list[str]) -> list[TapInfo]:
    """Describe the given module paths (channels, spatial size) from one dry-run forward."""
    hooks = FeatureHooks(model, paths)  # raises on unknown paths, naming the closest modules
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values)
        features = hooks.pop()
    finally:
        model.train(was_training)
        hooks.remove()
    return [tap_info(p, features[p], pixel_values.shape[-2]) for p in paths]


def stage_taps(taps: list[TapInfo], min_reduction: float) -> list[TapInfo]:
    """The automatic tap candidates: one per spatial size, the shallowest module there (the stage, not a layer
    inside it), the last one run among equals; pooled vectors count as one size.

    Maps finer than `min_reduction` (e.g. the stem at reduction 2) are left out: their codes cost the most memory.
    """
    best: dict[tuple[int, ...], tuple[int, int]] = {}  # spatial -> (depth, -position) of the best tap so far
    for i, t in enumerate(taps):
        if len(t.spatial) == 2 and t.reduction < min_reduction:
            continue
        rank = (t.path.count("."), -i)
        if t.spatial not in best or rank < best[t.spatial]:
            best[t.spatial] = rank
    chosen = sorted(-pos for _, pos in best.values())
    return [taps[i] for i in chosen]


def pair_taps(teacher: list[TapInfo], student: list[TapInfo]) -> list[tuple[TapInfo, TapInfo]]:
    """Pair teacher and student candidate taps of equal spatial size (maps by H×W, tokens by L, pooled vectors)."""
    by_size = {t.spatial: t for t in student}
    pairs = [(t, by_size[t.spatial]) for t in teacher if t.spatial in by_size]
    if not pairs:
        raise ValueError(
            "No teacher and student layers share a spatial size, so SRM has nothing to pair.\n"
            f"  teacher taps: {[str(t) for t in teacher]}\n  student taps: {[str(t) for t in student]}\n"
            "Pass explicit `layer_pairs` (teacher_path:student_path) and set `allow_resize=True`, or feed both "
            "models inputs of sizes that give matching feature grids."
        )
    return pairs
