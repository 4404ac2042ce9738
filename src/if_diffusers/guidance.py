"""Pure tensor functions of IF sampling and conditioning. Each takes tensors and returns tensors: no modules, no
randomness (noise is an argument), no host synchronisation."""

from __future__ import annotations

import torch


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
