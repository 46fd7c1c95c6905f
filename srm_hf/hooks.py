"""Forward hooks by module path: capture what the tapped modules return during a forward pass.

    hooks = FeatureHooks(model, {"layer2": "layer2", "layer3": "stages.2"})   # key -> module path
    model(x)
    features = hooks.pop()        # {"layer2": [N, C, H, W], "layer3": ...}; the store is cleared

Hooks are attached to the unwrapped model (DDP's `.module`, `torch.compile`'s `._orig_mod`), so they capture
whichever wrapper runs the forward. Attach them before compiling. Hooks created with `armed=False` capture only
inside `with hooks.capturing():`, so that a model hooked by a trainer runs as it was everywhere else (plain
inference keeps no activations); each hook is a small object, so a hooked model still pickles and deep-copies.
"""

import contextlib
import difflib

import torch
import torch.nn as nn

from .forward import first_tensor, unwrap_model


def get_module(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)` with an error that lists the closest existing module names."""
    model = unwrap_model(model)
    names = [name for name, _ in model.named_modules() if name]
    if path in names:
        return model.get_submodule(path)
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4) or names[-5:]
    raise ValueError(
        f"No module named {path!r} in {type(model).__name__}. Closest module names: {close}. "
        "Use a path from `model.named_modules()` (or `srm_hf.taps.describe_taps`), or let srm_hf pair layers "
        "automatically."
    )


def as_vector_if_pooled(feature: torch.Tensor) -> torch.Tensor:
    """[N, C, 1, 1] -> [N, C]: a 1x1 map is a pooled vector, on both sides of a pair."""
    return feature.flatten(1) if feature.dim() == 4 and feature.shape[2:] == (1, 1) else feature


class FeatureHooks:
    """Captures the outputs of modules by path; `pop()` returns them under the caller's keys (a 1x1 map as the
    pooled vector [N, C] it is) and clears the store. `paths` is a list (keys = paths) or a {key: path} dict."""

    def __init__(self, model: nn.Module, paths: list[str] | dict[str, str], armed: bool = True):
        self.paths = dict(paths) if isinstance(paths, dict) else {p: p for p in paths}
        self.armed = armed  # False: capture only inside `capturing()`
        self._depth = 0  # nested `capturing()` blocks
        self._features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}  # each capture's version counter, to see in-place changes after it
        self._handles = [get_module(model, p).register_forward_hook(_Capture(self, p))
                         for p in dict.fromkeys(self.paths.values())]  # one hook per module

    def capture(self, path: str, output) -> None:
        """What the hook of the module at `path` does with its output."""
        if self.armed:
            feature = self._features[path] = first_tensor(output)
            if feature is not None and not torch.compiler.is_compiling():  # compiled: no counters to compare
                self._versions[path] = feature._version

    def capturing(self) -> "FeatureHooks":
        """`with hooks.capturing():` captures inside the block, whatever `armed` says outside it."""
        return self

    def __enter__(self) -> "FeatureHooks":
        if self._depth == 0:
            self._armed_outside = self.armed
        self._depth, self.armed = self._depth + 1, True
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.armed = self._armed_outside

    def pop(self) -> dict[str, torch.Tensor]:
        """The captured features by key, in the given order. Raises if a tap did not run in the last forward."""
        missing = [p for p in self.paths.values() if self._features.get(p) is None]
        if missing:
            self.clear()
            raise RuntimeError(
                f"Taps {missing} captured no tensor in the last forward pass. Check that these modules run in the "
                "model's forward and return a tensor, or tap other modules"
                + ("." if self.armed else "; these hooks capture only inside `with hooks.capturing():`.")
            )
        changed = [p for p in self.paths.values() if p in self._versions and
                   self._features[p]._version != self._versions[p]]
        if changed:
            self.clear()
            raise RuntimeError(
                f"The outputs of {changed} were changed in place later in the forward pass (e.g. `x += shortcut` or "
                "an in-place ReLU after a BatchNorm), so they no longer hold what these modules returned. Tap the "
                "module whose output is final (e.g. the block that holds them)."
            )
        features = {key: as_vector_if_pooled(self._features[path]) for key, path in self.paths.items()}
        self.clear()
        return features

    def clear(self) -> None:
        self._features.clear()
        self._versions.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


class _Capture:
    """The forward hook of one tapped module: an object rather than a closure, so that the model pickles."""

    def __init__(self, hooks: FeatureHooks, path: str):
        self.hooks, self.path = hooks, path

    def __call__(self, module, args, output):
        self.hooks.capture(self.path, output)


def capturing(hooks: FeatureHooks | None):
    """`hooks.capturing()`, or nothing to do without hooks."""
    return contextlib.nullcontext() if hooks is None else hooks.capturing()
