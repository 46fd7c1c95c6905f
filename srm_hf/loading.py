"""Load an image classifier from the Hub, timm or a local folder, sized for the dataset's labels.

    timm:<architecture>     a timm architecture (`pretrained=False` builds it from scratch, e.g. a student)
    timm/<repo>, hf-hub:<repo>   a timm checkpoint on the Hub
    <local folder>          written by timm (config.json with "architecture") or by transformers
    <any other Hub id>      AutoModelForImageClassification
"""

import json
import os
import re

import torch.nn as nn
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)


def _is_timm_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        try:
            return "architecture" in json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON ({e}): restore the file, or save the model again.") from e


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a Hub id (`owner/name`) or a `timm:` name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def is_offline() -> bool:
    """Whether the Hub client is in offline mode (HF_HUB_OFFLINE, parsed by huggingface_hub itself)."""
    return is_offline_mode()


def is_timm_model(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and "architecture" in cfg and type(model).__module__.startswith("timm.")


def library_of(model: nn.Module) -> str:
    """Which library loads this model back: "timm", "transformers" or "pytorch" (a plain state dict)."""
    if isinstance(model, PreTrainedModel):
        return "transformers"
    return "timm" if is_timm_model(model) else "pytorch"


def load_image_classifier(
    name_or_path: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    pretrained: bool = True,
    **model_kwargs,
) -> nn.Module:
    """See the module docstring. `num_labels` resizes the classifier; `model_kwargs` go to the library's factory."""
    check_model_source(name_or_path)
    try:
        if name_or_path.startswith(("timm:", "timm/", "hf-hub:")) or (
            os.path.isdir(name_or_path) and _is_timm_folder(name_or_path)
        ):
            model = _load_timm(name_or_path, num_labels, pretrained, model_kwargs)
            if id2label is not None:  # written to config.json as `label_names` when the model is saved
                names = [id2label[i] for i in sorted(id2label, key=int)]  # keys may be strings, as JSON gives them
                model.pretrained_cfg = {**model.pretrained_cfg, "label_names": names}
            return model
        return _load_transformers(name_or_path, num_labels, id2label, pretrained, model_kwargs)
    except SafetensorError as e:
        raise ValueError(f"The weights of {name_or_path!r} cannot be read ({e}): a corrupt or truncated "
                         f"*.safetensors file in that folder. Restore it, or save the model again.") from e
    except OSError as e:
        hint = " HF_HUB_OFFLINE is set: use a local folder or a `timm:<architecture>` built from scratch." if (
            is_offline()) else ""
        if name_or_path.startswith("timm:") and pretrained:
            hint = f" `{name_or_path}` with pretrained weights downloads them; build it from scratch with " \
                   "pretrained=False (or --student_pretrained false)."
        raise OSError(f"Could not load the image classifier {name_or_path!r}: {e}.{hint}") from e


def check_model_source(name_or_path: str, option: str = "") -> None:
    """Fail fast, before any data is read or anything trained, on a source that cannot load: a local folder that is
    not there, a `timm:` architecture timm does not know. (Hub ids are resolved when the model loads.)"""
    where = f"{option}={name_or_path!r}" if option else repr(name_or_path)
    path = os.path.expanduser(name_or_path)
    if not os.path.exists(path) and (looks_like_a_path(name_or_path) or _offline_and_not_cached(name_or_path)):
        raise FileNotFoundError(f"No folder {where}{' (nor, offline, a Hub id in the cache)' if is_offline() else ''}: "
                                "give the path of a saved model, or a Hub id (`owner/name`) or `timm:<architecture>`.")
    if os.path.isfile(path):
        raise ValueError(f"{where} is a file: give the folder that holds it ({os.path.dirname(path) or '.'!r}).")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{where} holds no config.json, so no library can tell which model it is (a plain "
                         "nn.Module's weights alone): build the module and `load_state_dict` the model.safetensors "
                         "in it, then pass the module.")
    if name_or_path.startswith("timm:"):
        import timm

        architecture = name_or_path[len("timm:"):]
        if not timm.is_model(architecture):
            close = timm.list_models(f"{architecture.split('_')[0][:6]}*")[:8]
            hint = f" (close names: {', '.join(close)})" if close else ""
            raise ValueError(f"{where}: timm has no architecture {architecture!r}{hint}. "
                             "`timm.list_models('PATTERN*')` lists them.")


def _offline_and_not_cached(name: str) -> bool:
    """Offline, a Hub id (transformers, `timm/<repo>`, `hf-hub:<repo>`) whose config is not in the local Hub cache
    cannot load: for a transformers id, likely a local folder's path mistyped (`outputs/run`)."""
    if not is_offline() or name.startswith("timm:"):
        return False
    try:
        return not isinstance(try_to_load_from_cache(name.removeprefix("hf-hub:"), "config.json"), str)
    except ValueError:  # not a valid repo id either
        return True


def _load_timm(name_or_path, num_labels, pretrained, model_kwargs) -> nn.Module:
    import timm

    if num_labels is not None:
        model_kwargs = {**model_kwargs, "num_classes": num_labels}
    if name_or_path.startswith("timm:"):
        return timm.create_model(name_or_path[len("timm:"):], pretrained=pretrained, **model_kwargs)
    if os.path.isdir(name_or_path):
        return timm.create_model(f"local-dir:{name_or_path}", pretrained=pretrained, **model_kwargs)
    repo = name_or_path if name_or_path.startswith("hf-hub:") else f"hf-hub:{name_or_path}"
    return timm.create_model(repo, pretrained=pretrained, **model_kwargs)


def _load_transformers(name_or_path, num_labels, id2label, pretrained, model_kwargs) -> nn.Module:
    label_kwargs = {}
    if num_labels is not None:
        label_kwargs["num_labels"] = num_labels
    if id2label is not None:
        label_kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
        label_kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    if not pretrained:
        config = AutoConfig.from_pretrained(name_or_path, **label_kwargs, **model_kwargs)
        return AutoModelForImageClassification.from_config(config)
    return AutoModelForImageClassification.from_pretrained(
        name_or_path, ignore_mismatched_sizes=num_labels is not None, **label_kwargs, **model_kwargs
    )


def label_names_of(model: nn.Module) -> list[str] | None:
    """The class names a classifier records, in index order (transformers' `id2label`, timm's `label_names`), or
    None where it records none (or only transformers' placeholders `LABEL_<i>`)."""
    if is_timm_model(model):
        names = model.pretrained_cfg.get("label_names")
        return [names[k] for k in sorted(names, key=int)] if isinstance(names, dict) else list(names) if names else None
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return None if all(re.fullmatch(r"LABEL_\d+", n) for n in names) else names


def same_label(name) -> str:
    """A label name up to spacing and case: Fashion-MNIST's "T-shirt/top" (IDX files) is "T - shirt / top" on the
    Hub."""
    return "".join(str(name).split()).lower()


def check_label_names(teacher: nn.Module, student: nn.Module) -> None:
    """Distillation matches teacher and student outputs by index. Refuse the two when they record the same class
    names in another order (each student class would learn another's); warn when their names differ otherwise
    (another naming, such as synset ids, or other classes). Models that record no names are not compared."""
    names = label_names_of(teacher), label_names_of(student)
    if None in names or len(names[0]) != len(names[1]):
        return
    keys = [[same_label(n) for n in ns] for ns in names]
    if keys[0] == keys[1]:
        return
    first = next(i for i, (a, b) in enumerate(zip(*keys)) if a != b)
    found = f"class {first} is {names[0][first]!r} for the teacher and {names[1][first]!r} for the student"
    if sorted(keys[0]) == sorted(keys[1]):
        raise ValueError(f"The teacher and the student name the same classes in another order ({found}), and "
                         "distillation matches their outputs by index. Create the student with the teacher's labels "
                         "(id2label= and label2id= from teacher.config for transformers; timm: the same class order).")
    logger.warning(f"The teacher's class names differ from the student's ({found}); distillation matches their "
                   "outputs by index: check that index i is the same class for both.")


def load_image_processor(name_or_path: str):
    """The transformers image processor saved with a model, or None (timm models and plain folders have none)."""
    if name_or_path.startswith(("timm:", "timm/", "hf-hub:")):
        return None
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


class ClassifierAdapter(nn.Module):
    """Calls any image classifier as `model(pixel_values=..., labels=...)`, so the plain `Trainer` can train and
    evaluate timm models and plain modules too. `.model` is the classifier itself (what to save)."""

    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels=None):
        from transformers.modeling_outputs import ImageClassifierOutput

        from .forward import model_logits
        from .losses import classification_loss

        logits = model_logits(self.model(pixel_values))
        loss = None if labels is None else classification_loss(logits, labels, training=self.training)
        return ImageClassifierOutput(loss=loss, logits=logits)


def for_trainer(model: nn.Module) -> nn.Module:
    """The model as `transformers.Trainer` calls it: transformers models as they are, others adapted."""
    return model if isinstance(model, PreTrainedModel) else ClassifierAdapter(model)
