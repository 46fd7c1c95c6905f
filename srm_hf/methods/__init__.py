"""Distillation methods, one file each; `METHODS` maps the names `DistillationConfig(method=...)` accepts.

Adding a method: a file with a `Method` subclass, and one line here. A method written in a notebook needs
neither: pass the instance, `DistillationTrainer(method=MyMethod(...))`.
"""

from dataclasses import fields

from .alone import Alone
from .at import AT
from .base import Features, Method, StageSpec
from .dkd import DKD
from .fitnet import FitNet
from .kd import KD
from .reviewkd import ReviewKD
from .srm import SRM

METHODS: dict[str, type[Method]] = {
    "srm": SRM,
    "kd": KD,
    "dkd": DKD,
    "fitnet": FitNet,
    "at": AT,
    "reviewkd": ReviewKD,
    "alone": Alone,
}
METHOD_PREFIXES = {p for m in METHODS.values() for p in m.config_prefixes}  # `kd` for `kd_alpha`, ...


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {tuple(METHODS)}; or pass a Method instance as `method=`.")
    return METHODS[name]


def resolve_method(method: "Method | str | None", args) -> Method:
    """The method a trainer runs: an instance as given, else the named one (default `args.method`) built from
    `args`; checked against the config's fields of other methods, with the config's label smoothing."""
    method = method if isinstance(method, Method) else method_class(method or args.method).from_config(args)
    check_method_fields(args, method)
    method.label_smoothing = args.label_smoothing_factor
    return method


def check_method_fields(args, method: type[Method] | Method) -> None:
    """Refuse config fields set for another method (`dkd_alpha` with method='kd'): they would be ignored."""
    own = set(method.config_prefixes)
    others = METHOD_PREFIXES - own
    for f in fields(args):
        prefix = f.name.split("_", 1)[0]
        if prefix in others and f.init and getattr(args, f.name) != f.default:
            users = [n for n, m in METHODS.items() if prefix in m.config_prefixes]
            raise ValueError(
                f"{f.name}={getattr(args, f.name)!r} is a setting of method {' / '.join(users)}, but the method is "
                f"{method.name!r}, which would ignore it. Remove {f.name}, or choose one of those methods."
            )


__all__ = ["METHODS", "METHOD_PREFIXES", "AT", "Alone", "DKD", "Features", "FitNet", "KD", "Method", "ReviewKD", "SRM", "StageSpec",
           "check_method_fields", "method_class",
           "resolve_method"]
