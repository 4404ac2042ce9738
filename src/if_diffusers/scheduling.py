"""IF's scheduler settings per stage, as DeepFloyd's hub repos ship them (diffusers' DDPMScheduler)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

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


class SyncFreeDDPMStep:
    """`DDPMScheduler.step` over one call's timesteps, with no host read per step.

    diffusers' step finds the previous timestep with `nonzero`, indexes the schedule with device tensors and branches
    on `t > 0`: 11 host synchronisations per step on CUDA (measured), which also rule out capturing the loop in a CUDA
    graph. Here the timesteps are read once, before the loop, and each step's schedule coefficients are computed once
    per call with the same operations and precision as diffusers' step computes them at every step: the samples are
    bit-identical (tested on the CPU in float32, float16 and bfloat16), the random draws the same. On CUDA, once
    `add_noise` has moved the schedule to the device (img2img), diffusers' terms are device tensors where these are
    host scalars: half-precision samples may then differ in the last bit (not measured: no GPU).

    Covers the exact `DDPMScheduler` class with IF's "learned_range" variance or the default "fixed_small" (other
    variance types and subclasses keep the scheduler's own `step`).
    """

    VARIANCE_TYPES = ("learned_range", "fixed_small")

    def __init__(self, scheduler: DDPMScheduler, start: int):
        """For the scheduler's timesteps from index `start` on (img2img's first kept step); reads them on the host."""
        self.scheduler = scheduler
        all_timesteps = scheduler.timesteps.tolist()
        self.steps = [self._coefficients(t, all_timesteps[k + 1] if k + 1 < len(all_timesteps) else -1)
                      for k, t in enumerate(all_timesteps) if k >= start]  # fmt: skip

    @classmethod
    def applies_to(cls, scheduler: SchedulerMixin) -> bool:
        """The exact `DDPMScheduler` with a variance type this steps, whose `step` is not replaced on the instance."""
        return (type(scheduler) is DDPMScheduler and scheduler.config.variance_type in cls.VARIANCE_TYPES
                and "step" not in vars(scheduler))  # fmt: skip

    def _coefficients(self, t: int, prev_t: int) -> dict[str, Any]:
        """diffusers' step's 0-dim schedule terms at `t`, by its own expressions."""
        s = self.scheduler
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        # `_get_variance`'s terms (it recomputes current_beta_t as 1 - alpha_prod_t / alpha_prod_t_prev: the same)
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev),
                               min=1e-20)  # fmt: skip
        return {
            "t": t,
            "alpha_prod_t_sqrt": alpha_prod_t**0.5,
            "beta_prod_t_sqrt": beta_prod_t ** (0.5),
            "original_coefficient": (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t,
            "sample_coefficient": current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t,
            "min_log": torch.log(variance),
            "max_log": torch.log(1 - alpha_prod_t / alpha_prod_t_prev),
            "variance_sqrt": variance**0.5,
        }

    def step(self, index: int, model_output: torch.Tensor, sample: torch.Tensor, generator=None) -> torch.Tensor:
        """Step `index` of the call (`model_output` `(B, 3 or 6, H, W)`, `sample` `(B, 3, H, W)`): the previous
        sample, as `DDPMScheduler.step(...).prev_sample`."""
        s, c = self.scheduler, self.steps[index]
        learned = s.config.variance_type == "learned_range"
        if learned and model_output.shape[1] != sample.shape[1] * 2:
            raise ValueError(
                f"model_output has {model_output.shape[1]} channels; a learned_range DDPM step needs the noise and "
                f"the variance ({sample.shape[1] * 2})"
            )
        predicted_variance = None
        if learned:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        prediction_type = s.config.prediction_type
        if prediction_type == "epsilon":
            original = (sample - c["beta_prod_t_sqrt"] * model_output) / c["alpha_prod_t_sqrt"]
        elif prediction_type == "v_prediction":
            original = c["alpha_prod_t_sqrt"] * sample - c["beta_prod_t_sqrt"] * model_output
        elif prediction_type == "sample":
            original = model_output
        else:
            raise ValueError(
                f"prediction_type={prediction_type!r}: expected 'epsilon', 'v_prediction' or 'sample' for DDPM"
            )
        if s.config.thresholding:
            original = s._threshold_sample(original)
        elif s.config.clip_sample:
            original = original.clamp(-s.config.clip_sample_range, s.config.clip_sample_range)
        previous = c["original_coefficient"] * original + c["sample_coefficient"] * sample
        if c["t"] <= 0:
            return previous
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)  # fmt: skip
        if learned:
            frac = (predicted_variance + 1) / 2
            return previous + torch.exp(0.5 * (frac * c["max_log"] + (1 - frac) * c["min_log"])) * noise
        return previous + c["variance_sqrt"] * noise
