"""Super-resolution inpainting: (prompt, low-res image, high-res original, mask) -> a high-res result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.pipelines.deepfloyd_if import IFSafetyChecker, IFWatermarker
from diffusers.utils import replace_example_docstring
from transformers import T5EncoderModel, T5Tokenizer

from ..installed_versions import CLIPImageProcessor
from ..models import IFSuperResUNet2DConditionModel
from .base import IFPipelineBase
from .checks import (
    check_common_inputs,
    check_noise_level,
    check_strength,
    check_timesteps,
)
from .conditioning import DEFAULT_MAX_SEQUENCE_LENGTH

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from if_diffusers import IFInpaintingSuperResolutionPipeline

        >>> pipe = IFInpaintingSuperResolutionPipeline.from_pretrained(
        ...     "DeepFloyd/IF-II-L-v1.0", text_encoder=None, variant="fp16", torch_dtype=torch.float16
        ... )
        >>> pipe.enable_model_cpu_offload()
        >>> image = pipe(image=stage_1_images, original_image=original, mask_image=mask, prompt_embeds=prompt_embeds,
        ...              negative_prompt_embeds=negative_embeds, output_type="pt").images
        ```
"""


class IFInpaintingSuperResolutionPipeline(IFPipelineBase):
    """DeepFloyd IF super-resolution inpainting: the high-resolution `original_image` noised to `strength` and
    denoised conditioned on the low-res `image` and the prompt. A drop-in for `diffusers.IFInpaintingSuperResolutionPipeline`."""

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        unet: IFSuperResUNet2DConditionModel | UNet2DConditionModel,  # the plugin's class, or diffusers' (hub folders)
        scheduler: DDPMScheduler,
        image_noising_scheduler: DDPMScheduler,
        safety_checker: IFSafetyChecker | None,
        feature_extractor: CLIPImageProcessor | None,
        watermarker: IFWatermarker | None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        self._register_components(requires_safety_checker, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                                  scheduler=scheduler, image_noising_scheduler=image_noising_scheduler,
                                  safety_checker=safety_checker, feature_extractor=feature_extractor,
                                  watermarker=watermarker)  # fmt: skip

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None,
        original_image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        mask_image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        strength: float = 0.8,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        timesteps: str | list[int] | None = None,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        noise_level: int = 0,
        clean_caption: bool = True,
        *,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("intermediate_images",),
        max_sequence_length: int | None = DEFAULT_MAX_SEQUENCE_LENGTH,
        style_prompt: str | list[str] | None = None,
        style_prompt_embeds: torch.Tensor | None = None,
        positive_prompt: str | list[str] | None = None,
        positive_prompt_embeds: torch.Tensor | None = None,
        positive_mixer: float = 0.5,
        redraw_augmentation_noise: bool = False,
        low_res_consistency_factor: int | None = None,
        low_res_consistency_late_factor: int | None = None,
        low_res_consistency_late_timestep: int | None = None,
        float64_schedule: bool = True,
    ):
        """Repaint the masked part of `original_image` at high resolution, guided by the low-res `image` and the prompt.

        Args:
            image: the low-res images (stage I's output), PIL or arrays/tensors in `[-1, 1]`; one per prompt.
            original_image: the high-resolution images to start from: PIL (resized keeping aspect, short side
                `unet.config.sample_size`) or arrays/tensors in `[-1, 1]` at a size the UNet takes; one per prompt.
            mask_image: 1 where to repaint, as in `IFInpaintingPipeline`, at `original_image`'s size.
            strength: in `(0, 1]`, the share of the timesteps run from the noised original image.
            noise_level: augmentation level of the upsampled low-res image, in `[0, 1000)` (the original's
                `aug_level * 1000`).
            redraw_augmentation_noise: redraw the augmentation noise at every step and for each guidance half, as the
                original does (off: noised once, as diffusers).
            low_res_consistency_factor, low_res_consistency_late_factor, low_res_consistency_late_timestep: hold
                the output to `image` at these scales (ILVR), as in `IFSuperResolutionPipeline.__call__`.
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps, timesteps
                (presets "smart50", "super27", "super40", "super100", ...), guidance_scale, num_images_per_prompt,
                eta, generator, output_type, return_dict, callback, callback_steps, clean_caption,
                cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                max_sequence_length, style_prompt(_embeds), positive_prompt(_embeds), positive_mixer (0.5 here, as
                the original's stage II): as in `IFPipeline.__call__`.
            float64_schedule: keep the DDPM schedule in float64 as the original IF does (`False`: float32, as
                diffusers; the last steps then move by ~2e-4).

        Examples:

        Returns: `IFPipelineOutput(images, nsfw_detected, watermark_detected)` or that tuple.
        """
        self._legacy_callback(callback, callback_steps)
        batch_size = check_common_inputs(
            self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, output_type,
            callback_steps, callback_on_step_end_tensor_inputs, max_sequence_length, style_prompt,
            style_prompt_embeds, positive_prompt, positive_prompt_embeds, positive_mixer, guidance_scale,
            generator=generator,
        )  # fmt: skip
        check_noise_level(noise_level, self.image_noising_scheduler)
        check_strength(strength)
        timesteps = check_timesteps(self.scheduler, num_inference_steps, timesteps, strength)
        sample_size = self.unet.config.sample_size
        low_res = self._prepare_image(image, "image", batch_size)
        original = self._prepare_image(original_image, "original_image", batch_size, sample_size, unet_size=True)
        size = tuple(original.shape[-2:])
        consistency = self._check_low_res_consistency(low_res_consistency_factor, low_res_consistency_late_factor,
                                                      low_res_consistency_late_timestep, size)  # fmt: skip
        mask = self._prepare_mask(mask_image, original, batch_size, resize_to=sample_size)
        device = self._execution_device
        conditioning = self._prepare_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            device=device, clean_caption=clean_caption, max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale, cross_attention_kwargs=cross_attention_kwargs, style_prompt=style_prompt,
            style_prompt_embeds=style_prompt_embeds, positive_prompt=positive_prompt,
            positive_prompt_embeds=positive_prompt_embeds, positive_mixer=positive_mixer,
        )  # fmt: skip
        dtype = conditioning.prompt_embeds.dtype
        timesteps = self._prepare_timesteps(
            num_inference_steps, timesteps, device, strength, float64_schedule=float64_schedule
        )
        original = self._per_image(original, batch_size, num_images_per_prompt, device, dtype)
        mask = self._per_image(mask, batch_size, num_images_per_prompt, device, dtype)
        images = self._noised_start(original, timesteps, generator, mask)
        conditioning = self._add_low_res(conditioning, low_res, size, num_images_per_prompt, noise_level, generator,
                                         redraw_augmentation_noise, consistency)  # fmt: skip

        images = self._denoise(images, timesteps, conditioning, self._step_kwargs(generator, eta), callback_on_step_end,
                               callback_on_step_end_tensor_inputs, callback, callback_steps, mask)  # fmt: skip
        return self._finish(images, output_type, return_dict, dtype)
