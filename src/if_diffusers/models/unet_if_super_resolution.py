"""Super-resolution stages of DeepFloyd IF: (text, low-res image) -> 4x the pixels (IF-II-M / IF-II-L, or any
pixel-space stage III)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401  (ModelMixin: see below)
from diffusers.configuration_utils import register_to_config

from ..guidance import noise_augment
from ..scheduling import noising_scheduler
from .text_conditioning import IFTextConditioningMixin

# diffusers' pipeline loader imports this module (model_index.json names it) and looks up `ModelMixin` in it
# to find how to load the class: the import above is part of the on-disk format.

LOW_RES_CHANNELS = 3


def _extends_config_of(base_init):
    """Give `init` the signature `base_init` followed by `init`'s keyword-only arguments, so that diffusers'
    `register_to_config` and config loading see every stock key plus the new ones."""

    def decorate(init):
        extra = [p.replace(kind=p.POSITIONAL_OR_KEYWORD) for p in inspect.signature(init).parameters.values()
                 if p.kind is p.KEYWORD_ONLY]  # fmt: skip
        init.__signature__ = inspect.signature(base_init).replace(
            parameters=[*inspect.signature(base_init).parameters.values(), *extra]
        )
        return init

    return decorate


class IFSuperResUNet2DConditionModel(IFTextConditioningMixin, UNet2DConditionModel):
    """The super-resolution IF UNet: a `UNet2DConditionModel` that upsamples and noise-augments its low-res input.

    identical to `IFUNet2DConditionModel` except: `forward` may take the clean low-resolution image, the augmentation
    level and the caller's augmentation noise, and builds the 6-channel input and the level embedding itself, as the
    original `SuperResUNetModel` does; the augmentation schedule is part of the config. Called the stock way
    (a 6-channel `sample` and `class_labels=noise_level`, as diffusers' IF pipelines do) it behaves as the stock
    class. It never draws random numbers.

    Args (beyond `UNet2DConditionModel`'s):
        noise_augmentation_beta_schedule: `DDPMScheduler` beta schedule of the low-res augmentation.
        noise_augmentation_num_train_timesteps: number of augmentation levels (valid levels are `[0, N)`).
    """

    _preset_stage = "II"

    @register_to_config
    @_extends_config_of(UNet2DConditionModel.__init__)
    def __init__(
        self,
        *args: Any,
        noise_augmentation_beta_schedule: str = "squaredcos_cap_v2",
        noise_augmentation_num_train_timesteps: int = 1000,
        **kwargs: Any,
    ):
        defaults_of_all_keys = self.config.get("_use_default_values")
        super().__init__(*args, **kwargs)
        if defaults_of_all_keys is not None:  # the stock __init__ registered its own keys' list over ours
            self.register_to_config(_use_default_values=defaults_of_all_keys)
        self._schedules_by_device: dict[torch.device, torch.Tensor] = {}

    @property
    def noise_augmentation_alphas_cumprod(self) -> torch.Tensor:
        """`(N,)` float32 cumulative alphas of the augmentation schedule, on the CPU. Derived from the config, not
        stored: state dicts keep exactly the stock keys, and meta builds or `to_empty()` cannot corrupt it."""
        return noising_scheduler(
            self.config.noise_augmentation_beta_schedule, self.config.noise_augmentation_num_train_timesteps
        ).alphas_cumprod

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._schedules_by_device:
            self._schedules_by_device[device] = self.noise_augmentation_alphas_cumprod.to(device)
        return self._schedules_by_device[device]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *args: Any,
        low_res_image: torch.Tensor | None = None,
        noise_level: torch.Tensor | int | None = None,
        augmentation_noise: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Either the stock call (`sample` `(B, 6, H, W)` = noisy image + augmented upsampled low-res image,
        `class_labels` = augmentation level), or the original's:

        Args:
            sample: `(B, 3, H, W)` noisy high-resolution image.
            low_res_image: `(B, 3, h, w)` clean low-resolution image in `[-1, 1]`; upsampled to `(H, W)` bilinearly
                with `align_corners=True`, as the original does.
            noise_level: augmentation level, an int or `(B,)` integers in `[0, noise_augmentation_num_train_timesteps)`
                (the original's `aug_level * 1000`); an int is range-checked, a tensor is not (that would synchronise).
            augmentation_noise: `(B, 3, H, W)` standard normal noise for the augmentation, drawn by the caller.

        Other arguments are `UNet2DConditionModel.forward`'s. Output: `(B, 6, H, W)` noise and variance prediction.
        """
        if low_res_image is None:
            if noise_level is not None or augmentation_noise is not None:
                raise ValueError(
                    "noise_level and augmentation_noise only apply with low_res_image; got no low_res_image"
                )
            return super().forward(sample, timestep, encoder_hidden_states, class_labels, *args, **kwargs)
        noise_level = self._check_low_res_inputs(sample, class_labels, low_res_image, noise_level, augmentation_noise)
        upsampled = F.interpolate(low_res_image, size=sample.shape[-2:], mode="bilinear", align_corners=True)
        augmented = noise_augment(upsampled, augmentation_noise, noise_level, self._alphas_cumprod_on(sample.device))
        # noisy (B, 3, H, W) + augmented low-res (B, 3, H, W) -> (B, 6, H, W)
        model_input = torch.cat([sample, augmented.to(sample.dtype)], dim=1)
        return super().forward(model_input, timestep, encoder_hidden_states, noise_level, *args, **kwargs)

    def _check_low_res_inputs(self, sample, class_labels, low_res_image, noise_level, augmentation_noise):
        """Shapes only: checking values would synchronise with the device. Returns `noise_level` as `(B,)`."""
        batch, channels, height, width = sample.shape
        expected_channels = self.config.in_channels - LOW_RES_CHANNELS
        if channels != expected_channels:
            raise ValueError(f"sample has {channels} channels; with low_res_image expected {expected_channels}")
        if class_labels is not None:
            raise ValueError("class_labels was given with low_res_image: the augmentation level goes in noise_level")
        if low_res_image.ndim != 4 or low_res_image.shape[:2] != (batch, LOW_RES_CHANNELS):
            raise ValueError(
                f"low_res_image has shape {tuple(low_res_image.shape)}; expected ({batch}, {LOW_RES_CHANNELS}, h, w)"
            )
        if noise_level is None or augmentation_noise is None:
            raise ValueError("low_res_image needs noise_level and augmentation_noise (noise is drawn by the caller)")
        if augmentation_noise.shape != (batch, LOW_RES_CHANNELS, height, width):
            raise ValueError(
                f"augmentation_noise has shape {tuple(augmentation_noise.shape)}; expected the upsampled image's "
                f"{(batch, LOW_RES_CHANNELS, height, width)}"
            )
        levels = self.config.noise_augmentation_num_train_timesteps
        if isinstance(noise_level, int) and not 0 <= noise_level < levels:  # tensors are not read: no device sync
            raise ValueError(f"noise_level={noise_level}: expected an augmentation level in [0, {levels})")
        noise_level = torch.as_tensor(noise_level, device=sample.device)
        if noise_level.is_floating_point() or noise_level.ndim > 1 or noise_level.numel() not in (1, batch):
            raise ValueError(
                f"noise_level has dtype {noise_level.dtype} and shape {tuple(noise_level.shape)}; expected an int or "
                f"({batch},) integers"
            )
        return noise_level.long().expand(batch) if noise_level.numel() == 1 else noise_level.long()
