"""srm_hf: feature-level knowledge distillation for image classifiers in the Hugging Face Trainer, Sparse
Representation Matching first."""

from .config import DistillationConfig
from .distillation_model import DistillationModel
from .hooks import FeatureHooks
from .loading import load_image_classifier
from .losses import classification_loss, kd_loss
from .methods import AT, DKD, KD, METHODS, SRM, Alone, Features, FitNet, Method, ReviewKD, StageSpec
from .srm import SparseCoder, SRMHead, dictionary_loss, srm_loss, srm_targets
from .taps import TapInfo, TapPair, describe_taps, pair_taps
from .trainer import DistillationTrainer
from .transforms import AugmentedDataset, ImageTransform, preprocessing_for

__version__ = "0.1.0"

__all__ = [
    "AT",
    "AugmentedDataset",
    "DKD",
    "KD",
    "METHODS",
    "SRM",
    "Alone",
    "DistillationConfig",
    "DistillationModel",
    "DistillationTrainer",
    "FeatureHooks",
    "Features",
    "FitNet",
    "ImageTransform",
    "Method",
    "ReviewKD",
    "SRMHead",
    "SparseCoder",
    "StageSpec",
    "TapInfo",
    "TapPair",
    "classification_loss",
    "describe_taps",
    "dictionary_loss",
    "kd_loss",
    "load_image_classifier",
    "pair_taps",
    "preprocessing_for",
    "srm_loss",
    "srm_targets",
]
