"""Stage I inpainting: (prompt, image, mask) -> the image with the masked region repainted."""

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
from ..models import IFUNet2DConditionModel
from .base import IFPipelineBase
from .checks import check_common_inputs, check_strength, check_timesteps
from .conditioning import DEFAULT_MAX_SEQUENCE_LENGTH

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from if_diffusers import IFInpaintingPipeline

        >>> pipe = IFInpaintingPipeline.from_pretrained("DeepFloyd/IF-I-XL-v1.0", variant="fp16", torch_dtype=torch.float16)
        >>> pipe.enable_model_cpu_offload()
        >>> image = pipe("blue sunglasses", image=original, mask_image=mask, output_type="pt").images
        ```
"""


class IFInpaintingPipeline(IFPipelineBase):
    """DeepFloyd IF stage I inpainting: repaint where the mask is 1, keep the image where it is 0. A drop-in for
    `diffusers.IFInpaintingPipeline` with the additions of `IFPipeline`."""

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        unet: IFUNet2DConditionModel | UNet2DConditionModel,  # the plugin's class, or diffusers' (hub folders)
        scheduler: DDPMScheduler,
        safety_checker: IFSafetyChecker | None,
        feature_extractor: CLIPImageProcessor | None,
        watermarker: IFWatermarker | None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        self._register_components(requires_safety_checker, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                                  scheduler=scheduler, safety_checker=safety_checker,
                                  feature_extractor=feature_extractor, watermarker=watermarker)  # fmt: skip

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        mask_image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: str | list[int] | None = None,
        guidance_scale: float = 7.0,
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
        clean_caption: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        *,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("intermediate_images",),
        max_sequence_length: int | None = DEFAULT_MAX_SEQUENCE_LENGTH,
        style_prompt: str | list[str] | None = None,
        style_prompt_embeds: torch.Tensor | None = None,
        positive_prompt: str | list[str] | None = None,
        positive_prompt_embeds: torch.Tensor | None = None,
        positive_mixer: float = 0.25,
        float64_schedule: bool = True,
    ):
        """Repaint the masked part of `image` following the prompt.

        Args:
            image: as in `IFImg2ImgPipeline`.
            mask_image: 1 (white) where to repaint: PIL "L" images, or arrays/tensors in `[0, 1]` `(H, W)`,
                `(B, H, W)` or `(B, 1, H, W)`, binarised at 0.5; one, or one per prompt, at the image's size.
            strength: in `(0, 1]`, the share of the timesteps run inside the mask.
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps, timesteps,
                guidance_scale, num_images_per_prompt, eta, generator, output_type, return_dict, callback,
                callback_steps, clean_caption, cross_attention_kwargs, callback_on_step_end,
                callback_on_step_end_tensor_inputs, max_sequence_length, style_prompt(_embeds),
                positive_prompt(_embeds), positive_mixer: as in `IFPipeline.__call__`.
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
        check_strength(strength)
        timesteps = check_timesteps(self.scheduler, num_inference_steps, timesteps, strength)
        image = self._prepare_image(image, "image", batch_size, self.unet.config.sample_size, unet_size=True)
        mask = self._prepare_mask(mask_image, image, batch_size, resize_to=self.unet.config.sample_size)
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
        image = self._per_image(image, batch_size, num_images_per_prompt, device, dtype)
        mask = self._per_image(mask, batch_size, num_images_per_prompt, device, dtype)
        images = self._noised_start(image, timesteps, generator, mask)

        images = self._denoise(images, timesteps, conditioning, self._step_kwargs(generator, eta), callback_on_step_end,
                               callback_on_step_end_tensor_inputs, callback, callback_steps, mask)  # fmt: skip
        return self._finish(images, output_type, return_dict, dtype)
