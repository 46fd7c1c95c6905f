"""srm_hf: Sparse Representation Matching distillation for image classifiers in the Hugging Face Trainer."""

from .config import DistillationConfig
from .hooks import FeatureHooks, TapInfo, describe_taps, pair_taps
from .losses import classification_loss, dictionary_loss, kd_loss, srm_loss
from .modeling import DistillationModel
from .models import load_image_classifier
from .srm import SparseCoder, SRMHead, srm_targets
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "DistillationConfig",
    "DistillationModel",
    "DistillationTrainer",
    "FeatureHooks",
    "SRMHead",
    "SparseCoder",
    "TapInfo",
    "classification_loss",
    "describe_taps",
    "dictionary_loss",
    "kd_loss",
    "load_image_classifier",
    "pair_taps",
    "srm_loss",
    "srm_targets",
]
