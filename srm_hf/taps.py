"""Taps: where teacher and student features are read, described, discovered and paired.

A tap is a module path plus what a dry-run forward shows there (timm vocabulary: channels, reduction). A
`TapPair` joins a teacher tap and a student tap; its `key` names both sides' features, the method's modules for
the pair and their state-dict entries.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from .forward import eval_mode, model_logits, unwrap_model
from .hooks import FeatureHooks


@dataclass(frozen=True)
class TapInfo:
    """One tap as a dry-run forward sees it."""

    path: str
    channels: int
    spatial: tuple[int, ...]  # (H, W) for maps, (L,) for tokens, () for pooled vectors
    reduction: float  # input height / tap height for maps; 0 otherwise
    nesting: int = field(default=0, compare=False)  # enclosing modules whose output has another size (dry run)

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


def tap_key(path: str) -> str:
    """A module path as an `nn.ModuleDict` key (no dots)."""
    return path.replace(".", "-")


@dataclass(frozen=True)
class TapPair:
    teacher: TapInfo
    student: TapInfo

    @property
    def key(self) -> str:
        return tap_key(self.teacher.path)


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


def dry_run(model: nn.Module, pixel_values: torch.Tensor) -> tuple[list[TapInfo], torch.Tensor]:
    """One eval-mode forward that records every module's output.

    Returns the candidate taps in execution order, one per distinct output tensor (named by the outermost module
    that returned it as a plain tensor), and the model's logits. Modules that return the logits are not taps.
    """
    model = unwrap_model(model)
    records: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: records.append((name, out)))
               for name, m in model.named_modules() if name]
    try:
        with eval_mode(model):
            logits = model_logits(model(pixel_values))
    finally:
        for h in handles:
            h.remove()
    batch, image_size = logits.shape[0], pixel_values.shape[2:]
    token_lengths = {name: out.shape[1] for name, out in records
                     if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[0] == batch}
    features = [(name, out) for name, out in records if _is_feature(name, out, logits, image_size, token_lengths)]
    nesting = _nesting({name: tap_info(name, out, image_size[0]).spatial for name, out in features})
    taps: dict[int, TapInfo] = {}  # keyed by tensor identity; later (outer) modules overwrite inner ones
    for name, out in features:
        taps[id(out)] = replace(tap_info(name, out, image_size[0]), nesting=nesting[name])
    order = {id(out): i for i, (_, out) in enumerate(records) if id(out) in taps}
    return [taps[k] for k in sorted(taps, key=lambda k: order[k])], logits


def _is_feature(name: str, out, logits: torch.Tensor, image_size: tuple[int, int],
                token_lengths: dict[str, int]) -> bool:
    """Whether a module's output is a feature of this batch: a map [N, C, H, W], tokens [N, L, C] or a vector."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.dim() > 4 or out.shape[0] != logits.shape[0]:
        return False
    if out.data_ptr() == logits.data_ptr() or not out.is_floating_point():
        return False
    if out.dim() == 4 and not _same_aspect(out.shape[2:], image_size):
        return False  # not a [N, C, H, W] map of this image (e.g. NHWC or attention scores)
    # [N, heads, L, head_dim] inside a module that gives L tokens is attention, not a map, even when nearly square
    return out.dim() != 4 or all(token_lengths.get(a) != out.shape[2] for a in _ancestors(name))


def _nesting(sizes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """For each module path, how many enclosing modules output another size: a block that strides encloses its
    first layers. Containers of stages, whose children give three map sizes or more (timm's `stages`), don't count.
    """
    child_sizes: dict[str, set] = {}
    for name, size in sizes.items():
        if len(size) == 2 and _ancestors(name):
            child_sizes.setdefault(_ancestors(name)[0], set()).add(size)

    def encloses_another_size(path: str, size: tuple[int, ...]) -> bool:
        return path in sizes and sizes[path] != size and len(child_sizes.get(path, ())) < 3

    return {name: sum(encloses_another_size(a, size) for a in _ancestors(name)) for name, size in sizes.items()}


def _same_aspect(size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    h, w = size
    return (h, w) == (1, 1) or abs(w - h * image_size[1] / image_size[0]) <= 1


def _ancestors(path: str) -> list[str]:
    """The paths of the modules that contain `path`, innermost first ('a.b.c' -> ['a.b', 'a'])."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def describe_taps(model: nn.Module, pixel_values: torch.Tensor, paths: list[str]) -> list[TapInfo]:
    """Describe the given module paths (channels, spatial size) from one dry-run forward."""
    hooks = FeatureHooks(model, paths)  # raises on unknown paths, naming the closest modules
    try:
        with eval_mode(model):
            model(pixel_values)
        features = hooks.pop()
    finally:
        hooks.remove()
    return [tap_info(p, features[p], pixel_values.shape[-2]) for p in paths]


def stage_taps(taps: list[TapInfo], min_reduction: float) -> list[TapInfo]:
    """The automatic tap candidates: one per spatial size, the last module run at that size (the end of the stage,
    not the stem before it) among those that the fewest modules of other sizes enclose (not a layer of the next
    stage that runs before its stride); pooled vectors count as one size.

    Maps finer than `min_reduction` (e.g. the stem at reduction 2) are left out: their codes cost the most memory.
    So is the one map size of a model that also gives tokens, with the modules around it: a transformer's patch
    embedding, not a stage.
    """
    embedding = _patch_embedding(taps)
    best: dict[tuple[int, ...], tuple[int, int]] = {}  # spatial -> (nesting, -position) of the best tap so far
    for i, t in enumerate(taps):
        if len(t.spatial) == 2 and t.reduction < min_reduction or \
                any(path == t.path or path.startswith(t.path + ".") for path in embedding):
            continue
        rank = (t.nesting, -i)
        if t.spatial not in best or rank < best[t.spatial]:
            best[t.spatial] = rank
    chosen = sorted(-pos for _, pos in best.values())
    return [taps[i] for i in chosen]


def _patch_embedding(taps: list[TapInfo]) -> list[str]:
    """The paths of a transformer's patch embedding: every map when all maps share one size and the model also
    gives tokens (spatial (L,)); none otherwise."""
    maps = [t for t in taps if len(t.spatial) == 2]
    gives_tokens = any(len(t.spatial) == 1 for t in taps)
    return [t.path for t in maps] if gives_tokens and len({t.spatial for t in maps}) == 1 else []


def pair_taps(teacher: list[TapInfo], student: list[TapInfo]) -> list[TapPair]:
    """Pair teacher and student candidate taps of equal spatial size (maps by H×W, tokens by L, pooled vectors)."""
    by_size = {t.spatial: t for t in student}
    pairs = [TapPair(t, by_size[t.spatial]) for t in teacher if t.spatial in by_size]
    if not pairs:
        raise ValueError(
            "No teacher and student layers share a spatial size, so there is nothing to pair.\n"
            f"  teacher taps: {[str(t) for t in teacher]}\n  student taps: {[str(t) for t in student]}\n"
            "Pass explicit `layer_pairs` (teacher_path:student_path) and set `allow_resize=True`, or feed both "
            "models inputs of sizes that give matching feature grids."
        )
    return pairs


def format_tap_plan(pairs: list[TapPair]) -> str:
    """The pairing as lines 'teacher tap -> student tap', for the log and the recipe's output."""
    if not pairs:
        return "no taps (the method reads logits only)"
    return "\n".join(f"  {p.teacher}  ->  {p.student}" for p in pairs)


def plan_taps(teacher: nn.Module, student: nn.Module, teacher_pixel_values: torch.Tensor,
              pixel_values: torch.Tensor, args) -> list[TapPair]:
    """Pair the taps of both models: `args.layer_pairs` if given (checked), else automatically by grid size."""
    if args.explicit_pairs is None:
        return pair_taps(stage_taps(dry_run(teacher, teacher_pixel_values)[0], args.tap_min_reduction),
                         stage_taps(dry_run(student, pixel_values)[0], args.tap_min_reduction))

    teacher_paths, student_paths = zip(*args.explicit_pairs)
    duplicated = sorted({p for p in teacher_paths if teacher_paths.count(p) > 1})
    if duplicated:
        raise ValueError(
            f"layer_pairs uses the teacher taps {duplicated} more than once: each teacher tap can be paired with "
            "one student tap only. Remove the repeated entries."
        )
    pairs = [TapPair(t, s) for t, s in zip(describe_taps(teacher, teacher_pixel_values, list(teacher_paths)),
                                            describe_taps(student, pixel_values, list(student_paths)))]
    for pair in pairs:
        t, s = pair.teacher, pair.student
        same_grid = t.spatial == s.spatial
        # tokens [N, L, C] against a map: pixels in row-major order, up to 8 leading (class) tokens dropped
        as_tokens = len(s.spatial) == 1 and len(t.spatial) == 2 and 0 <= s.num_pixels - t.num_pixels <= 8
        resizable = args.allow_resize and len(t.spatial) == 2 and len(s.spatial) == 2
        if not (same_grid or as_tokens or resizable):
            raise ValueError(
                f"layer_pairs entry '{t.path}:{s.path}' pairs taps of different grids: teacher {t}, student {s}. "
                "Pick layers with the same spatial size (student tokens may match a teacher map of as many "
                "pixels), or set allow_resize=True (feature maps only)."
            )
    return pairs
