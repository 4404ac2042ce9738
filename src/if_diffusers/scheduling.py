"""IF's scheduler settings per stage, as DeepFloyd's hub repos ship them (diffusers' DDPMScheduler)."""

from __future__ import annotations

from diffusers import DDPMScheduler

# The original samples with learned-range variance on a 1000-step cosine schedule and dynamic thresholding
# (p = 0.95; c = 1.5 at stage I, 1.0 after).
_SAMPLE_MAX_VALUE = {"I": 1.5, "II": 1.0}


def denoising_scheduler(stage: str) -> DDPMScheduler:
    """The `scheduler` component of stage `"I"` or `"II"`."""
    if stage not in _SAMPLE_MAX_VALUE:
        raise ValueError(f"stage={stage!r}: expected one of {sorted(_SAMPLE_MAX_VALUE)}")
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=_SAMPLE_MAX_VALUE[stage],
    )


def noising_scheduler(beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The `image_noising_scheduler` of super-resolution stages: only its `add_noise` is used."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
