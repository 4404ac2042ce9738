"""Training objectives of IF's UNets: the original's hybrid loss (epsilon MSE + variational bound for the learned-range
variance) and the super-resolution stages' training inputs (`losses`, pure functions); the training loop
(`trainer.train`, `TrainingConfig`), its data (`data`: `CaptionedImageFolder`, T5 embedding cache) and command line
(`command_line`: `if-diffusers train`, `scripts/train.py`)."""

from .data import CaptionedImageFolder, ColumnsDataset, embed_captions, load_columns_dataset
from .losses import (
    DiffusionSchedule,
    diffusion_schedule,
    downsample,
    gaussian_blur,
    hybrid_loss,
    learned_range_log_variance,
    min_snr_weights,
    q_sample,
    sample_timesteps,
    super_resolution_inputs,
    vb_term,
)
from .trainer import TrainingConfig, diffusion_loss, train

__all__ = [
    "CaptionedImageFolder",
    "ColumnsDataset",
    "DiffusionSchedule",
    "TrainingConfig",
    "diffusion_loss",
    "diffusion_schedule",
    "downsample",
    "embed_captions",
    "gaussian_blur",
    "hybrid_loss",
    "load_columns_dataset",
    "learned_range_log_variance",
    "min_snr_weights",
    "q_sample",
    "sample_timesteps",
    "super_resolution_inputs",
    "train",
    "vb_term",
]
