"""The shared core of the six IF stage pipelines: prompt encoding, input checks, timesteps, one denoising loop with
classifier-free guidance over learned variance, and post-processing with the safety checker and watermarker.

The public classes (`pipeline_if*.py`) only declare their components and arguments and call these steps.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.deepfloyd_if import IFPipelineOutput
from diffusers.utils import deprecate, logging
from diffusers.utils.torch_utils import randn_tensor

from ..guidance import classifier_free_guidance, inpaint_blend
from ..image_processing import check_size, postprocess, size_multiple, to_image_tensor, to_mask_tensor
from ..text import preprocess_prompts
from ..timesteps import resolve_timesteps
from .checks import check_batch
from .conditioning import Conditioning

logger = logging.get_logger(__name__)

IMAGE_CHANNELS = 3
DEFAULT_MAX_SEQUENCE_LENGTH = 77  # IF's T5 was trained on 77 tokens


class IFPipelineBase(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Base of the six IF pipelines: `DiffusionPipeline` (with LoRA loading, as diffusers' IF pipelines) plus the
    shared IF steps. Public classes declare components and arguments and call these steps in order."""

    _optional_components = ["tokenizer", "text_encoder", "safety_checker", "feature_extractor", "watermarker"]
    model_cpu_offload_seq = "text_encoder->unet"
    _exclude_from_cpu_offload = ["watermarker"]
    _callback_tensor_inputs = ["intermediate_images", "prompt_embeds"]

    def _register_components(self, requires_safety_checker: bool, **components: Any) -> None:
        if components["safety_checker"] is None and requires_safety_checker:
            logger.warning(
                f"You have disabled the safety checker for {self.__class__.__name__} by passing `safety_checker=None`."
                " Ensure that you abide by the conditions of the IF license and do not expose unfiltered results in"
                " services or applications open to the public."
            )
        if components["safety_checker"] is not None and components["feature_extractor"] is None:
            raise ValueError(
                "safety_checker was given without feature_extractor: the checker needs its CLIP image processor; "
                "pass feature_extractor, or safety_checker=None"
            )
        self.register_modules(**components)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    # --- properties diffusers users read ----------------------------------------------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    # --- prompts ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clean_caption: bool = True,
        max_sequence_length: int | None = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T5 embeddings of the prompt and, with guidance, of the negative prompt ("" if none).

        Same contract as diffusers' `encode_prompt`, except that `clean_caption` defaults to `True` here as in
        `__call__`, and `max_sequence_length` (77, as IF was trained) may be raised, or `None` for the longest
        prompt, to encode long prompts in full. Returns `(B * num_images_per_prompt, L, D)` tensors.
        """
        if prompt is not None and negative_prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(
                f"negative_prompt is a {type(negative_prompt).__name__}; expected {type(prompt).__name__} like prompt"
            )
        device = device or self._execution_device
        batch_size = len(preprocess_prompts(prompt, False)) if prompt is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_embeds = self._encode_text(preprocess_prompts(prompt, clean_caption), max_sequence_length, device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = [""] * batch_size if negative_prompt is None else preprocess_prompts(negative_prompt, False)
            if len(negatives) != batch_size:
                raise ValueError(f"negative_prompt has {len(negatives)} prompts; expected {batch_size} like prompt")
            negatives = preprocess_prompts(negatives, clean_caption)
            negative_prompt_embeds = self._encode_text(negatives, prompt_embeds.shape[1], device, pad_to_length=True)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def _encode_text(self, prompts: list[str], max_length: int | None, device, pad_to_length: bool = False):
        """T5 encoder outputs `(N, L, D)`: padded to `max_length` (or to the longest prompt when `None`)."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "prompt was given but this pipeline has no tokenizer/text_encoder; pass prompt_embeds (and "
                "negative_prompt_embeds), or load the pipeline with its T5 components"
            )
        padding = "max_length" if max_length is not None else "longest"
        tokens = self.tokenizer(prompts, padding=padding, max_length=max_length, truncation=max_length is not None,
                                add_special_tokens=True, return_tensors="pt")  # fmt: skip
        if max_length is not None and not pad_to_length:
            full = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] > max_length:
                removed = self.tokenizer.batch_decode(full[:, max_length - 1 : -1])
                logger.warning(
                    f"T5 input was cut at max_sequence_length={max_length} tokens (IF was trained on 77); pass a "
                    f"larger max_sequence_length, or None, to encode it all. Cut: {removed}"
                )
        mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    # --- conditioning, timesteps, noise -----------------------------------------------------------------------

    def _prepare_conditioning(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, *, num_images_per_prompt, device,
        clean_caption, max_sequence_length, guidance_scale, cross_attention_kwargs, style_prompt=None,
        style_prompt_embeds=None, positive_prompt=None, positive_prompt_embeds=None, positive_mixer=None,
    ) -> Conditioning:  # fmt: skip
        """Encode every prompt and batch the embeddings as the UNet consumes them."""
        self._guidance_scale, self._cross_attention_kwargs, self._interrupt = (
            guidance_scale,
            cross_attention_kwargs,
            False,
        )
        cfg = self.do_classifier_free_guidance
        cond, uncond = self.encode_prompt(prompt, cfg, num_images_per_prompt, device, negative_prompt, prompt_embeds,
                                          negative_prompt_embeds, clean_caption, max_sequence_length)  # fmt: skip
        if not cfg:
            return Conditioning(cond, 1, guidance_scale, cross_attention_kwargs=cross_attention_kwargs)
        batches = [uncond, cond]
        positive = self._encode_extra(
            positive_prompt, positive_prompt_embeds, cond, num_images_per_prompt, clean_caption
        )
        if positive is not None:
            batches.append(positive)
        style = self._encode_extra(style_prompt, style_prompt_embeds, cond, num_images_per_prompt, clean_caption)
        pooled = None
        if style is not None:  # the original pools [style, positive, negative] for [cond, positive, uncond]
            pooled = torch.cat([uncond, style] + ([positive] if positive is not None else []))
        return Conditioning(
            torch.cat(batches), len(batches), guidance_scale,
            positive_mixer=(0.25 if positive_mixer is None else positive_mixer) if positive is not None else None,
            pooled_text_embeds=pooled, cross_attention_kwargs=cross_attention_kwargs,
        )  # fmt: skip

    def _encode_extra(self, prompt, embeds, like: torch.Tensor, num_images_per_prompt: int, clean_caption: bool):
        """A style or positive prompt, encoded to `like`'s token count so the batches can be stacked."""
        if prompt is None and embeds is None:
            return None
        if embeds is None:
            embeds = self._encode_text(preprocess_prompts(prompt, clean_caption), like.shape[1], like.device, True)
        if embeds.shape[1] != like.shape[1]:
            raise ValueError(
                f"extra prompt embeddings have {embeds.shape[1]} tokens; expected {like.shape[1]} like prompt_embeds"
            )
        return embeds.to(like).repeat_interleave(num_images_per_prompt, dim=0)

    def _prepare_timesteps(self, num_inference_steps: int, timesteps, device, strength: float | None = None):
        """Set the scheduler's timesteps (a count, a respacing preset or a list); img2img keeps the last `strength`
        of them (diffusers' `get_timesteps`). Returns the timesteps to run."""
        steps = resolve_timesteps(timesteps, self.scheduler.config.num_train_timesteps)
        if steps is not None:
            if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"timesteps={timesteps!r}: {type(self.scheduler).__name__} cannot take custom timesteps; use "
                    "num_inference_steps, or a scheduler that can (DDPMScheduler, DPMSolverMultistepScheduler, ...)"
                )
            self.scheduler.set_timesteps(timesteps=steps, device=device)
            num_inference_steps = len(steps)
        else:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected a positive int")
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        start = 0
        if strength is not None:
            start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
            start *= self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        run = self.scheduler.timesteps[start:]
        if len(run) == 0:
            raise ValueError(f"strength={strength} keeps no step of {num_inference_steps}; raise strength or steps")
        return run

    def _initial_noise(self, shape: tuple[int, ...], dtype, device, generator) -> torch.Tensor:
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)}; expected one per image ({shape[0]})")
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _noised_start(self, image: torch.Tensor, timesteps: torch.Tensor, generator, mask=None) -> torch.Tensor:
        """img2img / inpainting start: the image diffused to the first kept timestep (inside the mask only)."""
        noise = randn_tensor(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        noised = self.scheduler.add_noise(image, noise, timesteps[:1].repeat(image.shape[0]))
        return noised if mask is None else inpaint_blend(image, noised, mask)

    def _prepare_image(self, image, argument: str, batch_size: int, resize_to: int | None = None) -> torch.Tensor:
        """Validate and convert an input image batch to `(B, 3, H, W)` in `[-1, 1]` (no model runs)."""
        if image is None:
            raise ValueError(f"{argument} is required: expected a PIL image, an array or a tensor in [-1, 1]")
        tensor = to_image_tensor(image, argument, resize_to)
        check_batch(argument, tensor.shape[0], batch_size)
        return tensor

    def _prepare_mask(self, mask_image, image: torch.Tensor, batch_size: int, resize_to: int | None) -> torch.Tensor:
        """Validate and convert a mask to `(1 or B, 1, H, W)` of 0/1 matching `image`'s size."""
        if mask_image is None:
            raise ValueError("mask_image is required: expected a PIL image, an array or a tensor in [0, 1]")
        mask = to_mask_tensor(mask_image, "mask_image", resize_to)
        check_batch("mask_image", mask.shape[0], batch_size, allow_one=True)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"mask_image has size {tuple(mask.shape[-2:])}; expected the image's {tuple(image.shape[-2:])}"
            )
        return mask

    @staticmethod
    def _per_image(tensor: torch.Tensor, batch_size: int, num_images_per_prompt: int, device, dtype) -> torch.Tensor:
        """One row per generated image: a batch of 1 (a shared mask) serves all."""
        repeats = batch_size * num_images_per_prompt if tensor.shape[0] == 1 else num_images_per_prompt
        return tensor.to(device=device, dtype=dtype).repeat_interleave(repeats, dim=0)

    def _output_size(self, low_res: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
        """Super-resolution output size: given, or the input's x4 floored to a multiple of 32 and of what the UNet
        takes (the original's rule), never a silent squash to `sample_size`."""
        multiple = size_multiple(self.unet)
        step = multiple * 32 // math.gcd(multiple, 32)
        height = height if height is not None else max(step, low_res.shape[-2] * 4 // step * step)
        width = width if width is not None else max(step, low_res.shape[-1] * 4 // step * step)
        check_size(height, width, multiple)
        return height, width

    def _add_low_res(self, conditioning: Conditioning, low_res: torch.Tensor, size: tuple[int, int],
                     num_images_per_prompt: int, noise_level: int, generator, redraw: bool) -> Conditioning:  # fmt: skip
        """Upsample the low-res image to the output size (bilinear, align_corners=True, as the original) and
        noise-augment it at `noise_level`, once (diffusers) or at every step (`redraw`, the original)."""
        batch = conditioning.prompt_embeds.shape[0] // conditioning.copies
        low_res = self._per_image(low_res, batch // num_images_per_prompt, num_images_per_prompt,
                                  conditioning.prompt_embeds.device, self.unet.dtype)  # fmt: skip
        upscaled = F.interpolate(low_res, size, mode="bilinear", align_corners=True)
        level = torch.tensor([noise_level] * upscaled.shape[0], device=upscaled.device)
        if not redraw:
            noise = randn_tensor(upscaled.shape, generator=generator, device=upscaled.device, dtype=upscaled.dtype)
            upscaled = self.image_noising_scheduler.add_noise(upscaled, noise, timesteps=level)
        conditioning.upscaled, conditioning.noise_level = upscaled, torch.cat([level] * conditioning.copies)
        conditioning.redraw_augmentation, conditioning.generator = redraw, generator
        return conditioning

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        parameters = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in parameters else {}
        if "generator" in parameters:
            kwargs["generator"] = generator
        if "use_clipped_model_output" in parameters:
            # DDIM re-derives the noise from the thresholded x0, as the original's ddim_sample does.
            kwargs["use_clipped_model_output"] = True
        return kwargs

    # --- the denoising loop -----------------------------------------------------------------------------------

    def _denoise(
        self,
        images: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        step_kwargs: dict[str, Any],
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        callback: Callable | None = None,
        callback_steps: int = 1,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the scheduler over `timesteps` from `images` `(B, 3, H, W)`; one loop for every stage and mode.

        No host synchronisation per step: no `.item()`, no Python branch on tensor values.
        """
        self._num_timesteps = len(timesteps)
        uses_variance = self.scheduler.config.get("variance_type") in ("learned", "learned_range")
        text_cache = self.unet.text_cache() if hasattr(self.unet, "text_cache") else contextlib.nullcontext()
        prompt_embeds = conditioning.prompt_embeds
        with self.progress_bar(total=len(timesteps)) as progress_bar, text_cache:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                # noisy (k*B, 3, H, W) [+ low-res (k*B, 3, H, W) -> (k*B, 6, H, W) for super-resolution]
                model_input = self.scheduler.scale_model_input(torch.cat([images] * conditioning.copies), t)
                if conditioning.upscaled is not None:
                    model_input = torch.cat([model_input, self._augmented_low_res(conditioning)], dim=1)
                added = (
                    {"text_embeds": conditioning.pooled_text_embeds}
                    if conditioning.pooled_text_embeds is not None
                    else None
                )
                noise_pred = self.unet(
                    model_input, t, encoder_hidden_states=prompt_embeds, class_labels=conditioning.noise_level,
                    cross_attention_kwargs=conditioning.cross_attention_kwargs, added_cond_kwargs=added,
                    return_dict=False,
                )[0]  # fmt: skip
                if conditioning.copies > 1:  # (k*B, 6, H, W) -> (B, 6, H, W)
                    noise_pred = classifier_free_guidance(noise_pred, conditioning.guidance_scale, IMAGE_CHANNELS,
                                                          conditioning.positive_mixer)  # fmt: skip
                if not uses_variance:
                    noise_pred = noise_pred[:, :IMAGE_CHANNELS]
                previous = images
                images = self.scheduler.step(noise_pred, t, images, **step_kwargs, return_dict=False)[0]
                if mask is not None:
                    images = inpaint_blend(previous, images, mask)
                if callback_on_step_end is not None:
                    exposed = {"intermediate_images": images, "prompt_embeds": prompt_embeds}
                    outputs = callback_on_step_end(
                        self, i, t, {k: exposed[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    images = outputs.pop("intermediate_images", images)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()
                if callback is not None and i % callback_steps == 0:
                    callback(i, t, images)
        return images

    def _augmented_low_res(self, conditioning: Conditioning) -> torch.Tensor:
        """The low-res input of this step `(k*B, 3, H, W)`: augmented once, or redrawn per step and per batch copy as
        the original does (its `q_sample` runs inside every UNet call)."""
        low_res = torch.cat([conditioning.upscaled] * conditioning.copies)
        if not conditioning.redraw_augmentation:
            return low_res
        noise = randn_tensor(
            low_res.shape, generator=conditioning.generator, device=low_res.device, dtype=low_res.dtype
        )
        return self.image_noising_scheduler.add_noise(low_res, noise, conditioning.noise_level)

    @staticmethod
    def _legacy_callback(callback, callback_steps):
        if callback is not None or callback_steps != 1:
            deprecate("callback", "1.0.0", "Pass callback_on_step_end instead of callback/callback_steps.")

    # --- output -----------------------------------------------------------------------------------------------

    def _finish(self, images: torch.Tensor, output_type: str, return_dict: bool, dtype: torch.dtype):
        """Safety checker (on every output type), conversion, watermark (PIL), offload hooks."""
        nsfw_detected = watermark_detected = None
        if self.safety_checker is not None:
            checked = postprocess(images, "np")
            inputs = self.feature_extractor(self.numpy_to_pil(checked), return_tensors="pt").to(self._execution_device)
            checked, nsfw_detected, watermark_detected = self.safety_checker(
                images=checked, clip_input=inputs.pixel_values.to(dtype=dtype)
            )
            flagged = [n or w for n, w in zip(nsfw_detected, watermark_detected)]
            images = images.clone()
            images[torch.tensor(flagged, device=images.device)] = -1.0  # black, as the checker blacks them out
        result = postprocess(images, output_type)
        if output_type == "pil" and self.watermarker is not None:
            result = self.watermarker.apply_watermark(result, self.unet.config.sample_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result, nsfw_detected, watermark_detected
        return IFPipelineOutput(images=result, nsfw_detected=nsfw_detected, watermark_detected=watermark_detected)
