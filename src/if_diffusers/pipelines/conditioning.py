"""What the UNet sees besides the noisy images, batched for classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Conditioning:
    """Everything the UNet sees besides the noisy images, batched for guidance as `[uncond, cond(, positive)]`.

    `prompt_embeds` `(k * B, L, D)`; `pooled_text_embeds` the same shape when the pooled text differs (style
    transfer); super-resolution adds `upscaled` `(B, 3, H, W)` (clean, or augmented once), `noise_level` `(B,)`
    and `redraw_augmentation` to redraw the augmentation noise (from `generator`) at every step as the original does.
    """

    prompt_embeds: torch.Tensor
    copies: int
    guidance_scale: float
    positive_mixer: float | None = None
    pooled_text_embeds: torch.Tensor | None = None
    upscaled: torch.Tensor | None = None
    noise_level: torch.Tensor | None = None
    redraw_augmentation: bool = False
    generator: torch.Generator | list[torch.Generator] | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
