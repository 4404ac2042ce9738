"""Training objectives of IF's UNets: the original's hybrid loss (epsilon MSE + variational bound for the learned-range
variance) and the super-resolution stages' training inputs. Pure functions: no training loop, no data loading."""

from .losses import (
    DiffusionSchedule,
    diffusion_schedule,
    downsample,
    hybrid_loss,
    learned_range_log_variance,
    q_sample,
    sample_timesteps,
    super_resolution_inputs,
    vb_term,
)

__all__ = [
    "DiffusionSchedule",
    "diffusion_schedule",
    "downsample",
    "hybrid_loss",
    "learned_range_log_variance",
    "q_sample",
    "sample_timesteps",
    "super_resolution_inputs",
    "vb_term",
]
