"""IF's training objective and the super-resolution stages' training inputs, as pure functions.

The original trains with `deepfloyd_if.model.gaussian_diffusion.GaussianDiffusion.training_losses`, built by
`IFBaseModule.get_diffusion` with `learn_sigma=True, noise_schedule="cosine", use_kl=False,
rescale_learned_sigmas=True`: loss type `RESCALED_MSE`, mean type `EPSILON`, variance type `LEARNED_RANGE`. That is
improved DDPM's hybrid loss (Nichol & Dhariwal 2021, eq. 16):

    loss = mean((noise - eps)^2) + T / 1000 * L_vb(eps.detach(), v)

where `L_vb` is the variational-bound term in bits: `KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))` for t > 0 and the
discretized Gaussian decoder NLL at t = 0. With IF's 1000 training steps the factor `T / 1000` is 1.

Schedules are kept in float64 as the original's `GaussianDiffusion.__init__` computes them. The original then casts the
gathered per-step constants to float32 (`_extract_into_tensor(...).float()`) whatever the input dtype; here they are
cast to the input's dtype, which is the same for float32 training and keeps float64 exact.

Typical step (stage I):

    schedule = diffusion_schedule(denoising_scheduler("I"))
    timesteps = sample_timesteps(batch, generator, schedule.num_timesteps)
    noise = randn_tensor(x_start.shape, generator=generator)
    model_output = unet(q_sample(x_start, noise, timesteps, schedule), timesteps, text_embeddings).sample
    loss, terms = hybrid_loss(model_output, x_start, noise, timesteps, schedule)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ..guidance import noise_augment
from ..pipelines.cascade_inputs import resize
from ..scheduling import PREDICTION_TYPES

MAX_BLUR = 4.0  # low-res pixels: `gaussian_blur`'s kernel reaches 3 sigma, 25 taps at most

_LOG_2 = math.log(2.0)


@dataclass(frozen=True)
class DiffusionSchedule:
    """Per-step constants of the forward process, each `(T,)` float64, named as in the original's
    `GaussianDiffusion.__init__` (log betas and posterior quantities of q(x_{t-1} | x_t, x_0))."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"  # what the UNet's first half predicts: "epsilon" (IF's) or "v_prediction"

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> DiffusionSchedule:
        tensors = (getattr(self, field.name).to(device) for field in fields(self) if field.name != "prediction_type")
        return DiffusionSchedule(*tensors, prediction_type=self.prediction_type)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def diffusion_schedule(scheduler: DDPMScheduler) -> DiffusionSchedule:
    """The float64 schedule of a `DDPMScheduler`'s settings (`denoising_scheduler("I")`: cosine, 1000 steps), from
    its config rather than its float32 `betas`; as the original's `get_named_beta_schedule` + `GaussianDiffusion`.

    The variance must be learned-range (IF's hybrid loss learns it). The prediction is IF's "epsilon", or
    "v_prediction" (`v = sqrt(a_t) noise - sqrt(1 - a_t) x_0`, as the Stable Diffusion x4 upscaler predicts); other
    settings raise ValueError.
    """
    if not isinstance(scheduler, DDPMScheduler):
        raise TypeError(f"scheduler is a {type(scheduler).__name__}; expected a DDPMScheduler (IF's training one)")
    config = scheduler.config
    if config.prediction_type not in PREDICTION_TYPES or config.variance_type != "learned_range":
        raise ValueError(
            f"scheduler has prediction_type={config.prediction_type!r}, variance_type={config.variance_type!r}; "
            f"IF's hybrid loss needs one of {PREDICTION_TYPES} and 'learned_range' "
            "(use if_diffusers.scheduling.denoising_scheduler)"
        )
    if config.trained_betas is not None or config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler has trained_betas or rescale_betas_zero_snr: expected a named beta schedule")
    steps = config.num_train_timesteps
    if config.beta_schedule == "squaredcos_cap_v2":  # the original's "cosine" (betas_for_alpha_bar, max_beta 0.999)
        betas = [
            min(1 - _cosine_alpha_bar((i + 1) / steps) / _cosine_alpha_bar(i / steps), 0.999) for i in range(steps)
        ]
        betas = torch.tensor(betas, dtype=torch.float64)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float64)
    else:
        raise ValueError(
            f"scheduler has beta_schedule={config.beta_schedule!r}; expected 'squaredcos_cap_v2' or 'linear'"
        )
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return DiffusionSchedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        # clipped: the posterior variance is 0 at t = 0, so step 0 takes step 1's
        posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        posterior_mean_coef1=betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod - 1),
        prediction_type=config.prediction_type,
    )


Generators = torch.Generator | list[torch.Generator]  # one for the batch, or one per sample (diffusers' convention)


def check_generators(generator: Generators, batch: int) -> None:
    """TypeError unless `generator` is a `torch.Generator` or a list of `batch` of them (one per sample)."""
    if isinstance(generator, list):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError(
                f"generator is a list of {len(generator)}; expected {batch} torch.Generators, one per sample"
            )
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator is {generator!r}; expected a torch.Generator or a list of one per sample")


def uniform(batch: int, generator: Generators, device: torch.device | str) -> torch.Tensor:
    """`(batch,)` float32 uniform on `[0, 1)` on `device`, drawn from `generator` (or sample i from generator i)."""
    check_generators(generator, batch)
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device).to(device) for g in generator])
    return torch.rand(batch, generator=generator, device=generator.device).to(device)


def sample_timesteps(
    batch: int,
    generator: Generators,
    num_train_timesteps: int = 1000,
    bias_portion: float = 0.0,
    bias_multiplier: float = 1.0,
) -> torch.Tensor:
    """`(batch,)` int64 steps on `[0, num_train_timesteps)`, on the generator's device; with a list of generators
    (one per sample), step i is generator i's draw.

    By default uniform: the original's `UniformSampler` (whose importance weights are all 1, so none are returned).
    With `bias_portion` > 0 and `bias_multiplier` != 1, the noisiest `bias_portion` of the steps are drawn
    `bias_multiplier` times as often as the others (diffusers' `timestep_bias_strategy="later"`), e.g. portion 0.2
    and multiplier 4 put half of the draws in the noisiest fifth, where a text-to-image model decides the layout
    and the colours."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r}: expected a positive int")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r}: expected a positive int")
    check_generators(generator, batch)
    if isinstance(bias_portion, bool) or not isinstance(bias_portion, (int, float)) or not 0 <= bias_portion <= 1:
        raise ValueError(f"bias_portion={bias_portion!r}: expected a number in [0, 1]")
    if isinstance(bias_multiplier, bool) or not isinstance(bias_multiplier, (int, float)) or not bias_multiplier > 0:
        raise ValueError(f"bias_multiplier={bias_multiplier!r}: expected a positive number")
    if isinstance(generator, list):
        draws = [sample_timesteps(1, g, num_train_timesteps, bias_portion, bias_multiplier) for g in generator]
        return torch.cat([draw.to(generator[0].device) for draw in draws])
    biased = round(bias_portion * num_train_timesteps)
    if biased == 0 or bias_multiplier == 1:
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)
    weights = torch.ones(num_train_timesteps, device=generator.device)
    weights[num_train_timesteps - biased :] = bias_multiplier
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def min_snr_weights(timesteps: torch.Tensor, schedule: DiffusionSchedule, gamma: float) -> torch.Tensor:
    """`(B,)` float32 Min-SNR-gamma weights of the epsilon loss at `timesteps` (Hang et al. 2023, "Efficient Diffusion
    Training via Min-SNR Weighting Strategy"; diffusers' training scripts' `--snr_gamma`): `min(SNR, gamma) / SNR`
    with `SNR = alpha_bar / (1 - alpha_bar)`. Steps noisier than SNR = gamma keep weight 1; the nearly clean ones,
    whose epsilon error otherwise dominates the gradient, are scaled down, which speeds up learning what the noisy
    steps decide (layout, colours)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma={gamma!r}: expected a positive number")
    alphas_cumprod = schedule.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if schedule.prediction_type == "v_prediction":  # the v error is the epsilon error / sqrt(a): weigh the same
        return (snr.clamp(max=gamma) / (snr + 1)).float()
    return (snr.clamp(max=gamma) / snr).float()


def _at(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(T,)` float64 -> `(B, 1, 1, 1)` in `like`'s dtype; the original's `_extract_into_tensor` (which casts to
    float32 always)."""
    picked = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return picked.view(-1, *([1] * (like.ndim - 1)))


def pyramid_noise(noise: torch.Tensor, discount: float, generator: Generators) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise: `noise` `(B, C, H, W)` plus Gaussian noise drawn at every coarser scale,
    the side halved at each level down to one pixel, upsampled (nearest) and weighted by `discount ** level`, the sum
    divided by `sqrt(1 + sum(discount ** (2 level)))` so each pixel keeps unit variance. Levels are drawn from
    `generator` finest first, after `noise`.

    I.i.d. noise hides an image's coarse layout (its mean colour, which half is which colour) only in the last few
    steps, where IF's epsilon loss barely weighs the prediction of x_0; coarse noise hides it up to less noisy steps,
    so the model learns to take it from the text (Whitaker 2023; `noise_offset` is its one-pixel level alone)."""
    if not 0.0 <= discount < 1.0:
        raise ValueError(f"discount is {discount!r}; expected a number in [0, 1)")
    batch, channels, height, width = noise.shape
    total, variance, level = noise, 1.0, 1
    while height >> level >= 1 and width >> level >= 1:
        coarse = randn_tensor((batch, channels, height >> level, width >> level), generator=generator,
                              device=noise.device, dtype=noise.dtype)  # fmt: skip
        total = total + discount**level * F.interpolate(coarse, size=(height, width), mode="nearest")
        variance += discount ** (2 * level)
        level += 1
    return total / math.sqrt(variance)


def _mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def q_sample(
    x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, schedule: DiffusionSchedule
) -> torch.Tensor:
    """`x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`, `(B, C, H, W)`; the original's `q_sample`. The model input
    that `hybrid_loss` expects.

    Both roots are taken in float64 before the cast, as the original does. `guidance.noise_augment` (diffusers'
    `add_noise`) casts `a_t` first: in float32, `1 - a_t` (~4e-5 at t = 0) then keeps ~3 digits and the VB term
    at t <= 2 moves by ~2e-4 relative against the original (measured), so it is not used here.
    """
    signal, noise_scale = _scales(schedule, timesteps, x_start)
    return signal * x_start + noise_scale * noise


def _scales(schedule: DiffusionSchedule, timesteps: torch.Tensor, like: torch.Tensor):
    """`(sqrt(a_t), sqrt(1 - a_t))`, each `(B, 1, 1, 1)` in `like`'s dtype, the roots taken in float64."""
    return (_at(torch.sqrt(schedule.alphas_cumprod), timesteps, like),
            _at(torch.sqrt(1.0 - schedule.alphas_cumprod), timesteps, like))  # fmt: skip


def learned_range_log_variance(
    variance_values: torch.Tensor, timesteps: torch.Tensor, schedule: DiffusionSchedule
) -> torch.Tensor:
    """Log variance of p(x_{t-1} | x_t) from the model's variance channels `v` `(B, C, H, W)`: `v = -1` gives the
    clipped posterior variance, `v = 1` gives `beta_t`, interpolated in log space; the original's `LEARNED_RANGE`
    branch of `p_mean_variance` (improved DDPM eq. 15). `v` is not clamped, as in the original."""
    min_log = _at(schedule.posterior_log_variance_clipped, timesteps, variance_values)
    max_log = _at(torch.log(schedule.betas), timesteps, variance_values)
    frac = (variance_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats; the original's `losses.normal_kl`."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log probability (nats) of 8-bit images `x` in `[-1, 1]` under a Gaussian integrated over each pixel's bin of
    width 2/255 (the outer bins open-ended); the original's `losses.discretized_gaussian_log_likelihood`."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_term(
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: DiffusionSchedule,
) -> torch.Tensor:
    """`(B,)` variational-bound term in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0,
    the discretized decoder NLL of `x_start` at t = 0; the original's `_vb_terms_bpd(clip_denoised=False)`.

    Args:
        model_output: `(B, 2C, H, W)` epsilon then learned-range variance values; gradients reach both halves
            (`hybrid_loss` detaches epsilon first).
        x_start: `(B, C, H, W)` clean images in `[-1, 1]`; x_t: the same diffused to `timesteps` `(B,)`.
    """
    eps, variance_values = model_output.chunk(2, dim=1)
    log_variance = learned_range_log_variance(variance_values, timesteps, schedule)
    coef1, coef2 = (
        _at(schedule.posterior_mean_coef1, timesteps, x_t),
        _at(schedule.posterior_mean_coef2, timesteps, x_t),
    )
    pred_xstart = (
        _at(schedule.sqrt_recip_alphas_cumprod, timesteps, x_t) * x_t
        - _at(schedule.sqrt_recipm1_alphas_cumprod, timesteps, x_t) * eps
    )
    model_mean = coef1 * pred_xstart + coef2 * x_t
    true_mean = coef1 * x_start + coef2 * x_t
    true_log_variance = _at(schedule.posterior_log_variance_clipped, timesteps, x_t)
    kl = _mean_flat(_normal_kl(true_mean, true_log_variance, model_mean, log_variance)) / _LOG_2
    decoder_nll = -_mean_flat(_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * log_variance)) / _LOG_2
    return torch.where(timesteps.to(kl.device) == 0, decoder_nll, kl)


def _check_image(name: str, image: torch.Tensor) -> None:
    """4-D and in `[-1, 1]`: the decoder NLL bins pixels as 8-bit values scaled to `[-1, 1]` (reads the values)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"{name} has shape {tuple(getattr(image, 'shape', ()))}; expected (B, C, H, W)")
    low, high = image.min().item(), image.max().item()
    if low < -1 or high > 1:
        raise ValueError(f"{name} has values in [{low:.4g}, {high:.4g}]; expected images scaled to [-1, 1]")


def _check_steps(name: str, steps: torch.Tensor, batch: int, count: int) -> None:
    """`(batch,)` integers in `[0, count)` (reads the values)."""
    if not isinstance(steps, torch.Tensor) or steps.shape != (batch,) or steps.is_floating_point():
        raise ValueError(
            f"{name} has shape {tuple(getattr(steps, 'shape', ()))} and dtype {getattr(steps, 'dtype', None)}; "
            f"expected ({batch},) integers"
        )
    if steps.min().item() < 0 or steps.max().item() >= count:
        raise ValueError(f"{name} has values in [{steps.min().item()}, {steps.max().item()}]; expected [0, {count})")


def hybrid_loss(
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: DiffusionSchedule | DDPMScheduler,
    vb_weight: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IF's training loss per sample, `(B,)`, and its terms `{"mse", "vb"}` (each `(B,)`, `vb` already weighted);
    the original's `training_losses` with `LossType.RESCALED_MSE` and `LEARNED_RANGE` variance.

    `mse = mean((noise - eps)^2)` trains epsilon only; `vb = vb_weight * vb_term(eps.detach(), variance)` trains
    the variance only (improved DDPM: "don't let it affect our mean prediction").

    With a `schedule` of `prediction_type="v_prediction"` the first half of `model_output` is v instead:
    `mse = mean((v_target - v)^2)` with `v_target = sqrt(a_t) noise - sqrt(1 - a_t) x_start`, and the VB term reads
    the epsilon that v implies, `sqrt(a_t) v + sqrt(1 - a_t) x_t` (detached). Per sample, the v MSE is the implied
    epsilon's MSE divided by `a_t`: the noisiest steps weigh far more, in the units of x_0 that decide colours.

    Args:
        model_output: `(B, 2C, H, W)` the UNet's epsilon (or v) and variance values at `q_sample(x_start, noise,
            timesteps)`.
        x_start: `(B, C, H, W)` clean images in `[-1, 1]`.
        noise: `(B, C, H, W)` the standard normal noise that made the model input.
        timesteps: `(B,)` integer steps in `[0, T)`.
        schedule: a `DiffusionSchedule`, or the `DDPMScheduler` to build it from (`denoising_scheduler("I")`).
        vb_weight: factor of the VB term; default `T / 1000`, the original's `RESCALED_MSE` (1 for IF's T = 1000).
    """
    if isinstance(schedule, DDPMScheduler):
        schedule = diffusion_schedule(schedule)
    _check_image("x_start", x_start)
    batch, channels, height, width = x_start.shape
    if not isinstance(model_output, torch.Tensor) or model_output.shape != (batch, 2 * channels, height, width):
        raise ValueError(
            f"model_output has shape {tuple(getattr(model_output, 'shape', ()))}; expected "
            f"{(batch, 2 * channels, height, width)}: epsilon and learned-range variance values for each of "
            f"x_start's {channels} channels"
        )
    if not isinstance(noise, torch.Tensor) or noise.shape != x_start.shape:
        raise ValueError(
            f"noise has shape {tuple(getattr(noise, 'shape', ()))}; expected x_start's {tuple(x_start.shape)}"
        )
    _check_steps("timesteps", timesteps, batch, schedule.num_timesteps)
    weight = schedule.num_timesteps / 1000.0 if vb_weight is None else vb_weight

    x_t = q_sample(x_start, noise, timesteps, schedule)
    prediction, variance_values = model_output.chunk(2, dim=1)
    target, eps = noise, prediction
    if schedule.prediction_type == "v_prediction":
        signal, noise_scale = _scales(schedule, timesteps, x_start)
        target = signal * noise - noise_scale * x_start
        eps = signal * prediction + noise_scale * x_t
    # (B, C, H, W) frozen epsilon + (B, C, H, W) variance values -> (B, 2C, H, W)
    frozen_output = torch.cat([eps.detach(), variance_values], dim=1)
    terms = {
        "mse": _mean_flat((target - prediction) ** 2),
        "vb": vb_term(frozen_output, x_start, x_t, timesteps, schedule) * weight,
    }
    return terms["mse"] + terms["vb"], terms


def downsample(target: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """`(B, 3, H, W)` in `[-1, 1]` -> `(B, 3, H / scale, W / scale)`, bicubic with antialiasing, clamped to
    `[-1, 1]`: PIL's BICUBIC resize, which the original uses to prepare images (its training data pipeline is not
    in the package)."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale={scale!r}: expected a positive int")
    height, width = target.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"target has size {height}x{width}; expected sides divisible by scale={scale}")
    return resize(target, (height // scale, width // scale))


def super_resolution_inputs(
    target: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: Generators | None = None,
    *,
    scale: int = 4,
    noise_level: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    max_noise_level: int | None = None,
    max_blur: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-res conditioning of a super-resolution training step: `target` downsampled by `scale`, upsampled back
    bilinearly with `align_corners=True` and diffused to a uniform random level per sample; as the original
    `SuperResUNetModel.forward` does in training (`aug_level=None`: `aug_steps` uniform on `[0, 1000)`). With
    `max_blur`, the downsampled image is first blurred per sample (`gaussian_blur`).

    Args:
        target: `(B, 3, H, W)` high-res images in `[-1, 1]`.
        alphas_cumprod: `(N,)` augmentation schedule (`noising_scheduler().alphas_cumprod`, or the UNet's
            `noise_augmentation_alphas_cumprod`).
        generator: draws `noise_level` then `noise`, whichever is not given; or a list of one per sample.
        noise_level: `(B,)` integer levels in `[0, N)`; noise: `(B, 3, H, W)` standard normal.
        max_noise_level: draw `noise_level` on `[0, max_noise_level)` (at most N) instead of `[0, N)`, as the Stable
            Diffusion x4 upscaler trains; None: the original's whole range (the same draws as before the option).
        max_blur: blur the downsampled image with a Gaussian of standard deviation uniform on `[0, max_blur)`
            low-res pixels per sample, drawn from `generator` after `noise` (the conditioning augmentation of
            Cascaded Diffusion Models, Ho et al. 2021: the model learns to sharpen soft inputs, such as a base
            stage's samples, rather than copy them); None: no blur, no draw.
    Returns: the augmented upsampled image `(B, 3, H, W)` (the UNet's channels 3:6, as
        `IFSuperResUNet2DConditionModel(low_res_image=downsample(target), ...)` builds them) and `noise_level` `(B,)`
        (its `class_labels`).
    """
    _check_image("target", target)
    if max_blur is not None and (
        isinstance(max_blur, bool) or not isinstance(max_blur, (int, float)) or not 0 < max_blur <= MAX_BLUR
    ):
        raise ValueError(f"max_blur={max_blur!r}: expected a number in (0, {MAX_BLUR}] (low-res pixels) or None")
    batch = target.shape[0]
    if noise_level is None or noise is None or max_blur is not None:
        check_generators(generator, batch)  # it draws the missing noise_level, noise or blur
    levels = alphas_cumprod.shape[0]
    if max_noise_level is not None:
        if type(max_noise_level) is not int or not 1 <= max_noise_level <= levels:
            raise ValueError(f"max_noise_level={max_noise_level!r}: expected an int in [1, {levels}]")
        if noise_level is not None:
            raise ValueError("max_noise_level applies to drawn levels; got noise_level as well")
    if noise_level is None:
        noise_level = sample_timesteps(batch, generator, max_noise_level or levels).to(target.device)
    _check_steps("noise_level", noise_level, batch, levels)
    if noise is None:
        noise = randn_tensor(target.shape, generator=generator, device=target.device, dtype=target.dtype)
    if noise.shape != target.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected target's {tuple(target.shape)}")
    low_res = downsample(target, scale)
    if max_blur is not None:
        low_res = gaussian_blur(low_res, uniform(batch, generator, target.device) * max_blur)
    upsampled = F.interpolate(low_res, target.shape[-2:], mode="bilinear", align_corners=True)
    return noise_augment(upsampled, noise, noise_level, alphas_cumprod), noise_level


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` images, each blurred by a separable Gaussian of its own standard deviation `sigma` `(B,)` in
    pixels (0: unchanged), over `3 * max(sigma)` pixels each side with reflected borders; same shape and dtype."""
    if sigma.shape != images.shape[:1]:
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected ({images.shape[0]},)")
    batch, channels, height, width = images.shape
    radius = min(max(1, math.ceil(3 * float(sigma.max()))), min(height, width) - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    spread = sigma.float().clamp(min=1e-3)[:, None]
    taps = torch.exp(-0.5 * (offsets / spread) ** 2)
    taps = (taps / taps.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0).to(images.dtype)  # (B*C, K)
    groups = batch * channels
    flat = images.reshape(1, groups, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), taps[:, None, None, :], groups=groups)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), taps[:, None, :, None], groups=groups)
    return flat.reshape(images.shape)
