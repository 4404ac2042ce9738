"""Super-resolution: (prompt, low-res image) -> the image at 4x the size (stage II; any pixel stage)."""

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
from .base import IMAGE_CHANNELS, IFPipelineBase
from .checks import check_common_inputs, check_noise_level, check_timesteps
from .conditioning import DEFAULT_MAX_SEQUENCE_LENGTH

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from if_diffusers import IFSuperResolutionPipeline

        >>> pipe = IFSuperResolutionPipeline.from_pretrained(
        ...     "DeepFloyd/IF-II-L-v1.0", text_encoder=None, variant="fp16", torch_dtype=torch.float16
        ... )
        >>> pipe.enable_model_cpu_offload()
        >>> image = pipe(image=stage_1_images, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
        ...              timesteps="smart50", output_type="pt").images  # 64x64 -> 256x256, 64x96 -> 256x384
        ```
"""


class IFSuperResolutionPipeline(IFPipelineBase):
    """DeepFloyd IF super-resolution (stage II): denoise a 4x larger image conditioned on the prompt and the
    upsampled, noise-augmented low-res image. A drop-in for `diffusers.IFSuperResolutionPipeline`; unlike it, the
    output size follows the input (x4) instead of defaulting to `sample_size`, and is validated up front."""

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
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        num_inference_steps: int = 50,
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
        noise_level: int = 250,
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
        """Upscale `image` 4x following the prompt.

        Args:
            image: the low-res images, PIL or arrays/tensors in `[-1, 1]` (stage I's `output_type="pt"`); one per
                prompt.
            height, width: output size; by default the input's x4, floored to a multiple of 32 and of what the UNet
                takes, as the original does. A size the UNet cannot take is rejected with the nearest ones.
            noise_level: augmentation level of the upsampled low-res image, in `[0, 1000)` (the original's
                `aug_level * 1000`).
            redraw_augmentation_noise: redraw the augmentation noise at every step and for each guidance half, as the
                original does (off: noised once, as diffusers).
            low_res_consistency_factor: after every step, replace the samples' content coarser than this many pixels
                by that of `image` (upsampled bicubically, diffused to the step reached): ILVR (Choi et al. 2021),
                which holds the output to its low-res input while the UNet draws the finer detail. 4 in a x4 stage
                keeps what the input resolves, 2 also its bicubic interpolation one octave finer. `None` (default):
                off, as the original and diffusers. An int >= 2 dividing the output size.
            low_res_consistency_late_factor, low_res_consistency_late_timestep: with `low_res_consistency_factor`,
                the factor instead for the steps that end below this timestep (an int in `[1, num_train_timesteps)`),
                where the UNet draws the finest detail. 4, then 2 below 300, holds a x4 stage's last edges to the
                input's bicubic upsample: faint squares keep their corners, and fine points are rounded as the
                upsample rounds them (the demo model card). Both or neither; `None` (default): the factor at every
                step.
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
        timesteps = check_timesteps(self.scheduler, num_inference_steps, timesteps)
        low_res = self._prepare_image(image, "image", batch_size)
        size = self._output_size(low_res, height, width)
        consistency = self._check_low_res_consistency(low_res_consistency_factor, low_res_consistency_late_factor,
                                                      low_res_consistency_late_timestep, size)  # fmt: skip
        device = self._execution_device
        conditioning = self._prepare_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            device=device, clean_caption=clean_caption, max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale, cross_attention_kwargs=cross_attention_kwargs, style_prompt=style_prompt,
            style_prompt_embeds=style_prompt_embeds, positive_prompt=positive_prompt,
            positive_prompt_embeds=positive_prompt_embeds, positive_mixer=positive_mixer,
        )  # fmt: skip
        dtype = conditioning.prompt_embeds.dtype
        timesteps = self._prepare_timesteps(num_inference_steps, timesteps, device, float64_schedule=float64_schedule)
        shape = (batch_size * num_images_per_prompt, IMAGE_CHANNELS, *size)
        images = self._initial_noise(shape, dtype, device, generator)
        conditioning = self._add_low_res(conditioning, low_res, size, num_images_per_prompt, noise_level, generator,
                                         redraw_augmentation_noise, consistency)  # fmt: skip

        images = self._denoise(images, timesteps, conditioning, self._step_kwargs(generator, eta), callback_on_step_end,
                               callback_on_step_end_tensor_inputs, callback, callback_steps)  # fmt: skip
        return self._finish(images, output_type, return_dict, dtype)
