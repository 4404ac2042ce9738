"""Stage I text-to-image: prompt -> 64x64 (or any size the UNet takes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.pipelines.deepfloyd_if import IFSafetyChecker, IFWatermarker
from diffusers.utils import replace_example_docstring
from transformers import T5EncoderModel, T5Tokenizer

from ..image_processing import check_size, size_multiple
from ..installed_versions import CLIPImageProcessor
from ..models import IFUNet2DConditionModel
from .base import IMAGE_CHANNELS, IFPipelineBase
from .checks import check_common_inputs, check_timesteps
from .conditioning import DEFAULT_MAX_SEQUENCE_LENGTH

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from if_diffusers import IFPipeline

        >>> pipe = IFPipeline.from_pretrained("DeepFloyd/IF-I-XL-v1.0", variant="fp16", torch_dtype=torch.float16)
        >>> pipe.enable_model_cpu_offload()
        >>> image = pipe("a photo of a kangaroo holding a sign that says 'very deep learning'", timesteps="smart100",
        ...              output_type="pt").images  # (1, 3, 64, 64) in [-1, 1], for IFSuperResolutionPipeline
        ```
"""


class IFPipeline(IFPipelineBase):
    """DeepFloyd IF stage I: text to a small image. A drop-in for `diffusers.IFPipeline` (same components,
    arguments, defaults and outputs), plus `timesteps` presets, `callback_on_step_end`, long prompts, style transfer,
    positive-prompt mixing and any size the UNet takes."""

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
        num_inference_steps: int = 100,
        timesteps: str | list[int] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
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
        """Generate stage-I images from text.

        Args:
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds: as in diffusers; embeddings are T5
                outputs `(B, L, 4096)`.
            num_inference_steps: DDPM steps, used when `timesteps` is not given.
            timesteps: a respacing preset ("smart100", "fast27", ...; see `if_diffusers.timesteps`), a section
                string, or descending integers in `[0, 1000)`.
            guidance_scale: classifier-free guidance weight `w` (Imagen, eq. 2); `<= 1` disables guidance.
            num_images_per_prompt, eta, generator, output_type ("pil", "np", or "pt": `(B, 3, H, W)` in `[-1, 1]`),
                return_dict, cross_attention_kwargs: as in diffusers.
            height, width: output size (default `unet.config.sample_size`); any multiple of the UNet's downsampling
                factor, so any aspect ratio.
            callback, callback_steps: deprecated; use `callback_on_step_end(pipe, step, t, tensors) -> tensors` with
                `callback_on_step_end_tensor_inputs` from `_callback_tensor_inputs` (it may replace them).
            clean_caption: clean prompts as the original IF does (default everywhere, `encode_prompt` included).
            max_sequence_length: T5 tokens (77, as IF was trained); raise it or pass `None` for long prompts.
            style_prompt, style_prompt_embeds: text pooled into the time embedding instead of the prompt (the
                original's style transfer); the prompt still drives cross-attention.
            positive_prompt, positive_prompt_embeds, positive_mixer: the original's positive-prompt mixing,
                `eps = u + w * ((1 - m) * c + m * p - u)`.
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
        timesteps = check_timesteps(self.scheduler, num_inference_steps, timesteps)
        height = self.unet.config.sample_size if height is None else height
        width = self.unet.config.sample_size if width is None else width
        check_size(height, width, size_multiple(self.unet))
        device = self._execution_device

        conditioning = self._prepare_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            device=device, clean_caption=clean_caption, max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale, cross_attention_kwargs=cross_attention_kwargs, style_prompt=style_prompt,
            style_prompt_embeds=style_prompt_embeds, positive_prompt=positive_prompt,
            positive_prompt_embeds=positive_prompt_embeds, positive_mixer=positive_mixer,
        )  # fmt: skip
        timesteps = self._prepare_timesteps(num_inference_steps, timesteps, device, float64_schedule=float64_schedule)
        shape = (batch_size * num_images_per_prompt, IMAGE_CHANNELS, height, width)
        images = self._initial_noise(shape, conditioning.prompt_embeds.dtype, device, generator)

        images = self._denoise(images, timesteps, conditioning, self._step_kwargs(generator, eta), callback_on_step_end,
                               callback_on_step_end_tensor_inputs, callback, callback_steps)  # fmt: skip
        return self._finish(images, output_type, return_dict, conditioning.prompt_embeds.dtype)
