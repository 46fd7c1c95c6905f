"""Command-line parsing for the recipes: dataclasses, a YAML `--config`, flags that override it.

    parser = SRMParser((DataArguments, ModelArguments, DistillationConfig))
    data_args, model_args, config = parser.parse(["--config", "recipes/configs/cifar10.yaml", "--max_steps", "5"])

Every YAML key must be a field of one of the dataclasses: an unknown key is an error, not silently ignored. A
single-valued field that may be None takes `none` (or `null`) on the command line (not `report_to`, whose `none`
is a value of its own), YAML's null in the file; other fields refuse null. Flags are not abbreviated. An
`env:` mapping (as in TRL's configs) sets environment variables for the run; those a library reads when imported
(HF_HUB_OFFLINE, HF_HOME) must be set before the launch instead.
"""

import argparse
import dataclasses
import json
import os
import types
import typing

import yaml
from transformers import HfArgumentParser


NONE_IS_A_VALUE = {"report_to"}  # fields where the text "none" means something of its own (lists too: --compare none)


def _or_none(kind):
    """argparse's `type` for a field that may be None: 'none' / 'null' give None, anything else `kind`."""
    def convert(text: str):
        return None if text.strip().lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its errors ("invalid int value")
    return convert


def allows_none(annotation) -> bool:
    """Whether a type annotation admits None (`int | None`, `Optional[str]`)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


class SRMParser(HfArgumentParser):
    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--num_train_epoch 3` is an unknown flag, not a guess
        super().__init__(dataclass_types, **kwargs)
        # from the annotations: HfArgumentParser strips None from the fields' own `type`, for every later parser too
        self.nullable = {f.name for d in self.dataclass_types for hints in [typing.get_type_hints(d)]
                         for f in dataclasses.fields(d) if allows_none(hints[f.name])}  # a flag's 'none', YAML's null
        for action in self._actions:
            if action.dest in self.nullable - NONE_IS_A_VALUE and action.type is not None and action.nargs in (None, "?"):
                action.value_type, action.type = action.type, _or_none(action.type)
        self.given: set[str] = set()  # after `parse`: the fields the YAML config or a flag set
        self.flags: set[str] = set()  # after `parse`: those a flag set

    def parse(self, args: list[str] | None = None) -> tuple:
        """Parse `args` (default: sys.argv[1:]) with `--config file.yaml` (or `--config=file.yaml`) as defaults under
        the flags."""
        import sys

        args = list(sys.argv[1:] if args is None else args)
        config_path = None
        for i, arg in enumerate(args):
            if arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
                del args[i]
                break
            if arg == "--config":
                if i + 1 >= len(args):
                    raise ValueError("--config needs a YAML file path.")
                config_path = args[i + 1]
                del args[i : i + 2]
                break
        values = self._read_yaml(config_path) if config_path is not None else {}
        self.set_defaults(**values)
        flags = {self._option_string_actions[a.split("=", 1)[0]].dest for a in args
                 if a.startswith("--") and a.split("=", 1)[0] in self._option_string_actions}
        self.given, self.flags = set(values) | flags, flags
        outputs = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        *dataclasses, remaining = outputs
        if remaining:
            raise ValueError(f"Unknown command-line arguments {remaining}: see --help for the accepted flags.")
        return tuple(dataclasses)

    def _read_yaml(self, path: str) -> dict:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Config file {path!r} does not exist.")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of option names to values.")
        env = values.pop("env", None) or {}  # as in TRL's configs: environment variables for the run
        if not isinstance(env, dict):
            raise ValueError(f"`env` in {path} must be a mapping of environment variable names to values.")
        known = {action.dest for action in self._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown keys {unknown} in {path}: each key must be a command-line option (see --help).")
        os.environ.update({str(k): str(v) for k, v in env.items() if v is not None})
        actions = {action.dest: action for action in self._actions}
        for key, value in values.items():
            if value is None and key not in self.nullable:
                raise ValueError(f"{key}: null in {path}, but {key} needs a value: give one, or remove the key to "
                                 "keep its default.")
            _check_type(actions[key], key, value, path)
        # argparse leaves non-string defaults as they are: keep mappings as JSON text for str-typed fields, and give
        # list options a list (`metrics: accuracy` is one metric, not eight letters)
        lists = {k for k, v in values.items() if actions[k].nargs in ("+", "*") and isinstance(v, (str, int, float))}
        # a number for a text option (`output_dir: 5`, `hub_model_id: 2024`) is the text YAML read as a number
        text = {k for k, a in actions.items() if getattr(a, "value_type", a.type) is str}
        values = {k: str(v) if k in text and isinstance(v, (int, float)) and not isinstance(v, bool)
                  else v for k, v in values.items()}
        return {k: json.dumps(v) if isinstance(v, dict) else [v] if k in lists else v for k, v in values.items()}


def _check_type(action, key: str, value, path: str) -> None:
    """argparse converts only strings: a YAML number or boolean must already be of the option's type (`max_steps:
    2.5` is refused, not truncated)."""
    kind = getattr(action, "value_type", action.type)  # int or float under `_or_none`
    if kind is None or isinstance(value, dict):
        return
    if isinstance(value, list) and action.nargs is None:
        raise ValueError(f"{key} in {path} takes one value, not the list {value}.")
    for v in value if isinstance(value, list) else [value]:
        if action.choices is not None and v is not None and str(v) not in [str(c) for c in action.choices]:
            raise ValueError(f"{key}: {v!r} in {path} is not one of {list(action.choices)} (YAML reads a bare no/yes "
                             "as a boolean: quote it).")
        if v is None or isinstance(v, str):
            continue  # argparse converts (and checks) strings itself
        if kind in (int, float):
            ok = isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)
        else:
            try:
                kind(str(v))
                ok = True
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                ok = False
        if not ok:
            raise ValueError(f"{key}: {v!r} in {path} is not a valid {getattr(kind, '__name__', kind)}. Write a value "
                             "of the option's type (see --help).")


def parse_kwargs(value, name: str = "", example: str = '{"drop_rate": 0.1}') -> dict:
    """A mapping option (`*_kwargs`, `stage_batch_sizes`): a JSON object on the command line or a mapping in YAML.
    `name` and `example` go into the error."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    option = f"{name}: " if name else ""
    if not isinstance(value, str):
        raise ValueError(f"{option}expected a mapping or a JSON object such as '{example}', got {value!r}.")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option}expected a JSON object such as '{example}', got {value!r}: {e}") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"{option}expected a JSON object such as '{example}', got {value!r}.")
    return parsed
