"""Command-line parsing for the recipes: dataclasses, a YAML `--config`, flags that override it.

    parser = SRMParser((DataArguments, ModelArguments, DistillationConfig))
    data_args, model_args, config = parser.parse(["--config", "recipes/configs/cifar10.yaml", "--max_steps", "5"])

Every YAML key must be a field of one of the dataclasses: an unknown key is an error, not silently ignored.
"""

import json
import os

import yaml
from transformers import HfArgumentParser


class SRMParser(HfArgumentParser):
    def parse(self, args: list[str] | None = None) -> tuple:
        """Parse `args` (default: sys.argv[1:]) with `--config file.yaml` as defaults under the flags."""
        import sys

        args = list(sys.argv[1:] if args is None else args)
        config_path = None
        if "--config" in args:
            i = args.index("--config")
            if i + 1 >= len(args):
                raise ValueError("--config needs a YAML file path.")
            config_path = args[i + 1]
            del args[i : i + 2]
        if config_path is not None:
            self.set_defaults(**self._read_yaml(config_path))
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
        known = {action.dest for action in self._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown keys {unknown} in {path}: each key must be a command-line option (see --help).")
        # argparse leaves non-string defaults as they are: keep mappings as JSON text for str-typed fields
        return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()}


def parse_kwargs(value) -> dict:
    """A `*_kwargs` option: a JSON object on the command line or a mapping in YAML."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"Expected a JSON object such as '{{\"drop_rate\": 0.1}}', got {value!r}: {e}") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"Expected a JSON object, got {value!r}.")
    return parsed
