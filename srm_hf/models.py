"""Load an image classifier from the Hub, timm or a local folder."""

import json
import os

import torch.nn as nn
from transformers import AutoModelForImageClassification


def _is_timm_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return "architecture" in json.load(f)


def load_image_classifier(name_or_path: str, **kwargs) -> nn.Module:
    """`timm/<name>` or `hf-hub:<repo>` -> timm; a local folder -> timm or transformers by its config.json;
    any other Hub id -> `AutoModelForImageClassification`. `kwargs` go to the library's loader."""
    try:
        if name_or_path.startswith(("timm/", "hf-hub:")):
            import timm

            repo = name_or_path if name_or_path.startswith("hf-hub:") else f"hf-hub:{name_or_path}"
            return timm.create_model(repo, pretrained=True, **kwargs)
        if os.path.isdir(name_or_path) and _is_timm_folder(name_or_path):
            import timm

            return timm.create_model(f"local-dir:{name_or_path}", pretrained=True, **kwargs)
        return AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " HF_HUB_OFFLINE is set: download it once online, or pass a local folder." if offline else ""
        raise OSError(f"Could not load the image classifier {name_or_path!r}: {e}.{hint}") from e
