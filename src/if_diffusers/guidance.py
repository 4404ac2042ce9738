"""Pure tensor functions of IF sampling and conditioning. Each takes tensors and returns tensors: no modules, no
randomness (noise is an argument), no host synchronisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def noise_augment(
    image: torch.Tensor, noise: torch.Tensor, level: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Diffuse `image` to integer step `level`: `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise` (Ho et al. 2020, eq. 4).

    The original's `low_res_diffusion.q_sample`, computed as diffusers' `DDPMScheduler.add_noise` does (schedule
    cast to the image's dtype first) so both give the same bits.

    Args:
        image: `(B, C, H, W)` clean images in `[-1, 1]`.
        noise: standard normal noise of the same shape, drawn by the caller.
        level: `(B,)` integer steps in `[0, len(alphas_cumprod))`.
        alphas_cumprod: `(T,)` cumulative products of `1 - beta_t`.
    """
    alphas_cumprod = alphas_cumprod.to(device=image.device, dtype=image.dtype)
    alpha_bar = alphas_cumprod[level.to(image.device)].flatten().view(-1, *([1] * (image.ndim - 1)))
    return alpha_bar**0.5 * image + (1 - alpha_bar) ** 0.5 * noise


def classifier_free_guidance(
    model_output: torch.Tensor,
    guidance_scale: float,
    channels: int = 3,
    positive_mixer: float | None = None,
) -> torch.Tensor:
    """Guide a UNet output batched as `[uncond, cond]` (or `[uncond, cond, positive]`) along dim 0.

    `eps = uncond + w * (cond - uncond)` (Ho & Salimans 2022; Imagen's `w`). With a positive prompt, the original
    IF's mix: `eps = uncond + w * ((1 - m) * cond + m * positive - uncond)`. The learned variance (channels after
    `channels`) is taken from the conditional half, as in the original and diffusers.

    Args:
        model_output: `(k * B, 2 * channels, H, W)` with `k` = 2, or 3 when `positive_mixer` is given.
    Returns: `(B, 2 * channels, H, W)`.
    """
    # split, not slices: as few operator calls per step as diffusers' IF pipelines dispatch
    sizes = [channels, model_output.shape[1] - channels]
    parts = [part.split(sizes, dim=1) for part in model_output.chunk(2 if positive_mixer is None else 3)]
    uncond, (cond, variance) = parts[0][0], parts[1]
    target = cond if positive_mixer is None else (1 - positive_mixer) * cond + positive_mixer * parts[2][0]
    return torch.cat([uncond + guidance_scale * (target - uncond), variance], dim=1)


def inpaint_blend(previous: torch.Tensor, updated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep known pixels (mask 0) from the previous sample, take the new one where the mask is 1; as the original's
    `p_sample(inpainting_mask=...)`: `(1 - m) * x_t + m * x_{t-1}`."""
    return (1 - mask) * previous + mask * updated


def low_pass(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The content of `images` `(B, C, H, W)` coarser than `factor` pixels: area-downsampled by `factor` (which
    divides `H` and `W`), then upsampled bicubically back to `(B, C, H, W)` (ILVR's `phi_N`)."""
    return F.interpolate(F.avg_pool2d(images, factor), images.shape[-2:], mode="bicubic", align_corners=False)


def low_res_consistency(images: torch.Tensor, reference: torch.Tensor, factor: int) -> torch.Tensor:
    """ILVR's refinement (Choi et al. 2021, eq. 6): `images` `(B, 3, H, W)` with their content coarser than `factor`
    pixels replaced by `reference`'s (same shape, diffused to the same step as `images` by the caller):
    `x - phi_N(x) + phi_N(y)`. Finer detail is left to the sampler."""
    return images - low_pass(images, factor) + low_pass(reference, factor)
