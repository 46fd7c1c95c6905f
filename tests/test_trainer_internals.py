"""The Trainer internals DistillationTrainer relies on. These are transformers' private methods: when a release
changes one, this file fails first and names what changed, instead of a confusing error deep inside training."""

import inspect
import re
import typing
from pathlib import Path

import pytest
from transformers import Trainer

import srm_hf.trainer
from srm_hf import DistillationTrainer

# name -> the parameters (after self) that our override takes and forwards
OVERRIDDEN_INTERNALS = {
    "_get_grad_norm": ["model", "grad_norm"],
    "_build_accelerator_args": ["kwargs"],
    "_save": ["output_dir", "state_dict"],
    "_save_checkpoint": ["model", "trial"],
    "_load_from_checkpoint": ["resume_from_checkpoint", "model"],
    "_load_best_model": [],
    "_push_from_checkpoint": ["checkpoint_folder"],
}
# private Trainer members called (not overridden), with their parameters after self
CALLED_INTERNALS = {"_finish_current_push": []}
INITIAL_VALUES = ["num_train_epochs", "num_update_steps_per_epoch", "num_examples", "num_train_samples",
                  "total_train_batch_size", "steps_in_epoch", "max_steps"]


@pytest.mark.parametrize("name, params", list(OVERRIDDEN_INTERNALS.items()))
def test_overridden_private_methods_keep_their_signature(name, params):
    assert hasattr(Trainer, name), f"transformers' Trainer no longer has {name}: DistillationTrainer.{name} is dead code"
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)[1:]
    assert theirs == params, f"Trainer.{name} now takes {theirs}, DistillationTrainer overrides it as {params}"
    assert name in own_members(), f"{name} is listed here but no longer overridden"


def own_members() -> set[str]:
    """What DistillationTrainer and its srm_hf mixins (HubMixin) define."""
    return {n for cls in DistillationTrainer.__mro__ if cls.__module__.startswith("srm_hf") for n in vars(cls)}


def test_only_the_listed_private_methods_are_overridden():
    private = {n for n in own_members() if n.startswith("_") and not n.startswith("__")}
    assert private == set(OVERRIDDEN_INTERNALS)


@pytest.mark.parametrize("name, params", list(CALLED_INTERNALS.items()))
def test_called_private_methods_exist_with_their_signature(name, params):
    assert hasattr(Trainer, name), f"transformers' Trainer no longer has {name}, which srm_hf.hub calls"
    assert list(inspect.signature(getattr(Trainer, name)).parameters)[1:] == params


def test_set_initial_training_values_returns_the_seven_values_we_unpack():
    hint = typing.get_type_hints(Trainer.set_initial_training_values)["return"]
    assert len(typing.get_args(hint)) == len(INITIAL_VALUES), f"the tuple is now {hint}"
    doc = inspect.getdoc(Trainer.set_initial_training_values)
    assert re.findall(r"`(\w+)`", doc) == INITIAL_VALUES, f"the documented order changed: {doc}"
    source = inspect.getsource(DistillationTrainer.set_initial_training_values)
    unpacked = re.search(r"\((num_train_epochs.*?)\) = super\(\)", source, re.S).group(1)
    assert [n.strip() for n in unpacked.split(",")] == INITIAL_VALUES


def test_the_trainer_names_no_method():
    source = Path(srm_hf.trainer.__file__).read_text()
    for name in ('"kd"', '"srm"', '"hint"', '"joint"', '"dictionary"', '"dkd"', '"fitnet"', '"at"', '"reviewkd"'):
        assert name not in source, f"trainer.py names the method or stage {name}: that belongs in srm_hf/methods/"


def test_every_file_reads_in_one_sitting():
    root = Path(srm_hf.trainer.__file__).parent
    lengths = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert max(lengths.values()) <= 300, {k: v for k, v in lengths.items() if v > 300}
    assert lengths["trainer.py"] < 250
