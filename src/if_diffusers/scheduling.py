"""IF's scheduler settings per stage, as DeepFloyd's hub repos ship them (diffusers' DDPMScheduler)."""

from __future__ import annotations

import inspect

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# The original samples with learned-range variance on a 1000-step cosine schedule and dynamic thresholding
# (p = 0.95; c = 1.5 at stage I, 1.0 after).
_SAMPLE_MAX_VALUE = {"I": 1.5, "II": 1.0}
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# What IF's UNets predict ("epsilon"), or the v of the Stable Diffusion x4 upscaler that `TrainingConfig` can train.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def denoising_scheduler(stage: str, prediction_type: str = "epsilon") -> DDPMScheduler:
    """The `scheduler` component of stage `"I"` or `"II"`; for a UNet that predicts `prediction_type`: IF's
    "epsilon", or "v_prediction" (what `training.train` teaches a UNet when given this scheduler)."""
    if stage not in _SAMPLE_MAX_VALUE:
        raise ValueError(f"stage={stage!r}: expected one of {sorted(_SAMPLE_MAX_VALUE)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type=prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=_SAMPLE_MAX_VALUE[stage],
    )


def noising_scheduler(beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The `image_noising_scheduler` of super-resolution stages: only its `add_noise` is used."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


def takes_learned_variance(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler.step` takes the UNet's 6 channels `(B, 6, H, W)` (noise and learned variance) rather than
    the noise alone `(B, 3, H, W)`: only where it samples with the variance.

    That is a scheduler whose `_get_variance` reads a `predicted_variance` (DDPM, DDPM-Parallel, UnCLIP) and whose
    own config sets a learned `variance_type`. `Cls.from_config(IF's DDPM config)` copies
    `variance_type="learned_range"` into every scheduler's config, also into those that never read it (DDIM, Euler,
    UniPC, ...) and would fail on 6 channels, which is why diffusers' IF pipelines crash with them. DPM-Solver and
    SA-Solver slice the variance off themselves, but only for an epsilon model: given a v-prediction UNet's 6
    channels they fail too, so they get the noise channels (for epsilon, the same images).
    """
    get_variance = getattr(type(scheduler), "_get_variance", None)
    reads = get_variance is not None and "predicted_variance" in inspect.signature(get_variance).parameters
    return reads and scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES


def set_schedule_precision(scheduler: SchedulerMixin, float64: bool) -> None:
    """Keep a `DDPMScheduler`'s `alphas_cumprod` in float64, as the original's GaussianDiffusion does, or in float32,
    as diffusers does. Other schedulers are left as they are.

    Near t = 0, `1 - alphas_cumprod` is ~4e-5 and float32 keeps only ~3 of its digits: the last DDPM step of a
    float32 schedule moves the image by ~2e-4 against the original (1/30 of an 8-bit level).
    """
    if type(scheduler) is not DDPMScheduler:
        return
    alphas = 1.0 - scheduler.betas.to(torch.float64 if float64 else torch.float32)
    scheduler.alphas_cumprod = torch.cumprod(alphas, dim=0).to(scheduler.betas.device)
