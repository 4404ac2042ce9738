"""The shared core of the six IF stage pipelines: timesteps, image preparation, one denoising loop with
classifier-free guidance over learned variance, and post-processing with the safety checker and watermarker.
Prompt encoding lives in `conditioning.py`, input checks in `checks.py`.

The public classes (`pipeline_if*.py`) only declare their components and arguments and call these steps.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, LMSDiscreteScheduler
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import deprecate, logging
from diffusers.utils.torch_utils import randn_tensor

from ..guidance import classifier_free_guidance, inpaint_blend, low_res_consistency
from ..image_processing import (
    check_size,
    size_multiple,
    super_resolution_size,
    to_image_tensor,
    to_mask_tensor,
)
from ..models.attention import restore_sdpa_processors
from ..scheduling import SyncFreeDDPMStep, set_schedule_precision, takes_learned_variance
from .checks import check_batch, check_low_res_consistency
from .compilation import CompileMixin
from .conditioning import Conditioning, LowResConsistency, PromptConditioningMixin
from .hub_layout import HubLayoutMixin
from .output import (
    IFPipelineOutput,
    black_out,
    check_safety,
    register_with_safety_components,
    to_output_images,
)

logger = logging.get_logger(__name__)

IMAGE_CHANNELS = 3
LMS_ORDER = 4  # LMSDiscreteScheduler.step's default order


class IFPipelineBase(
    CompileMixin, HubLayoutMixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin, PromptConditioningMixin
):
    """Base of the six IF pipelines: `DiffusionPipeline` (with LoRA loading, as diffusers' IF pipelines), prompt
    encoding (`PromptConditioningMixin`), `enable_compile()` (`CompileMixin`) and the shared IF steps. Public
    classes declare components and arguments and call these steps in order."""

    _optional_components = ["tokenizer", "text_encoder", "safety_checker", "feature_extractor", "watermarker"]
    model_cpu_offload_seq = "text_encoder->unet"
    _exclude_from_cpu_offload = ["watermarker"]
    _callback_tensor_inputs = ["intermediate_images", "prompt_embeds"]
    # set per call by `_prepare_timesteps`: per-call state, as the scheduler's own timesteps (one call at a time per
    # pipeline, as with diffusers' pipelines)
    _sync_free_step: SyncFreeDDPMStep | None = None

    def _register_components(self, requires_safety_checker: bool, **components: Any) -> None:
        register_with_safety_components(self, requires_safety_checker, **components)

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

    # --- timesteps and noise ---------------------------------------------------------------------------------

    def _prepare_timesteps(self, num_inference_steps: int, steps: list[int] | None, device,
                           strength: float | None = None, float64_schedule: bool = True) -> torch.Tensor:  # fmt: skip
        """Set the scheduler's timesteps (`steps` as `check_timesteps` resolved them, or `num_inference_steps`) and
        its schedule's precision; img2img keeps the last `strength` of them (diffusers' `get_timesteps`). Returns the
        timesteps to run."""
        set_schedule_precision(self.scheduler, float64_schedule)
        if steps is not None:
            self.scheduler.set_timesteps(timesteps=steps, device=device)
            num_inference_steps = len(steps)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        start = 0
        if strength is not None:
            # `order` UNet calls per step (Heun, KDPM2, DPM-Solver SDE: 2): their timesteps are [t0, t1, t1, t2, t2,
            # ...], and index `k * order` is the first call at step k.
            start = (
                num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            ) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        self._sync_free_step = (
            SyncFreeDDPMStep(self.scheduler, start) if SyncFreeDDPMStep.applies_to(self.scheduler) else None
        )
        return self.scheduler.timesteps[start:]

    def _initial_noise(self, shape: tuple[int, ...], dtype, device, generator) -> torch.Tensor:
        """Starting noise `shape` from `generator` (a list has one per image: `check_common_inputs`)."""
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _noised_start(self, image: torch.Tensor, timesteps: torch.Tensor, generator, mask=None) -> torch.Tensor:
        """img2img / inpainting start: the image diffused to the first kept timestep (inside the mask only)."""
        noise = randn_tensor(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        noised = self.scheduler.add_noise(image, noise, timesteps[:1].repeat(image.shape[0]))
        return noised if mask is None else inpaint_blend(image, noised, mask)

    def _prepare_image(self, image, argument: str, batch_size: int, resize_to: int | None = None,
                       unet_size: bool = False) -> torch.Tensor:  # fmt: skip
        """Validate and convert an input image batch to `(B, 3, H, W)` in `[-1, 1]` (no model runs): one image per
        prompt; with `unet_size`, at a size the UNet takes (the images the denoising starts from)."""
        if image is None:
            raise ValueError(f"{argument} is required: expected a PIL image, a numpy array or a tensor in [-1, 1]")
        tensor = to_image_tensor(image, argument, resize_to)
        check_batch(argument, tensor.shape[0], batch_size)
        if unet_size:
            first = image[0] if isinstance(image, (list, tuple)) else image
            note = ""
            if resize_to is not None and isinstance(first, PIL.Image.Image):
                note = (f" ({argument} is PIL, resized to {tuple(tensor.shape[-2:])} with its short side at {resize_to} "
                        "as diffusers does; pass an array or tensor of a size that works)")  # fmt: skip
            check_size(*tensor.shape[-2:], size_multiple(self.unet), f"{argument} height/{argument} width", note)
        return tensor

    def _prepare_mask(self, mask_image, image: torch.Tensor, batch_size: int, resize_to: int | None) -> torch.Tensor:
        """Validate and convert a mask to `(1 or B, 1, H, W)` of 0/1 at `image`'s size, so that it broadcasts over the
        image batch (no model runs)."""
        if mask_image is None:
            raise ValueError("mask_image is required: expected a PIL image, a numpy array or a tensor in [0, 1]")
        mask = to_mask_tensor(mask_image, "mask_image", resize_to)
        check_batch("mask_image", mask.shape[0], batch_size, allow_one=True)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"mask_image has size {tuple(mask.shape[-2:])}; expected the image's {tuple(image.shape[-2:])} "
                "(PIL masks are resized like PIL images)"
            )
        return mask

    @staticmethod
    def _per_image(tensor: torch.Tensor, batch_size: int, num_images_per_prompt: int, device, dtype) -> torch.Tensor:
        """One row per generated image: a batch of 1 (a shared mask) serves all."""
        repeats = batch_size * num_images_per_prompt if tensor.shape[0] == 1 else num_images_per_prompt
        return tensor.to(device=device, dtype=dtype).repeat_interleave(repeats, dim=0)

    def _output_size(self, low_res: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
        """Super-resolution output size: `height`/`width` when given (rejected unless the UNet takes them), else the
        input's x4 floored to a size the UNet takes (`super_resolution_size`, the original's rule), never a squash to
        `sample_size` as in diffusers. Flooring is logged; an input too small for any size is rejected."""
        multiple = size_multiple(self.unet)
        x4 = (low_res.shape[-2] * 4, low_res.shape[-1] * 4)
        floored = super_resolution_size(*low_res.shape[-2:], multiple)
        if (height is None and floored[0] == 0) or (width is None and floored[1] == 0):
            raise ValueError(
                f"image has size {tuple(low_res.shape[-2:])}: x4 is {x4}, smaller than the UNet's smallest size "
                f"{multiple}; pass height and width (multiples of {multiple})"
            )
        size = (floored[0] if height is None else height, floored[1] if width is None else width)
        check_size(*size, multiple)
        if (height is None and floored[0] != x4[0]) or (width is None and floored[1] != x4[1]):
            logger.warning(
                f"image has size {tuple(low_res.shape[-2:])}: x4 {x4} is not a size the UNet takes (multiples of "
                f"{multiple}); the output is {size}. Pass height and width to choose."
            )
        return size

    def _add_low_res(self, conditioning: Conditioning, low_res: torch.Tensor, size: tuple[int, int],
                     num_images_per_prompt: int, noise_level: int, generator, redraw: bool,
                     consistency: LowResConsistency | None = None) -> Conditioning:  # fmt: skip
        """Upsample the low-res image to the output size (bilinear, align_corners=True, as the original) and
        noise-augment it at `noise_level`, once (diffusers) or at every step (`redraw`, the original). With
        `consistency`, also keep its clean bicubic upsample, which the denoising holds the samples' coarse content
        to."""
        batch = conditioning.prompt_embeds.shape[0] // conditioning.copies
        low_res = self._per_image(low_res, batch // num_images_per_prompt, num_images_per_prompt,
                                  conditioning.prompt_embeds.device, self.unet.dtype)  # fmt: skip
        upscaled = F.interpolate(low_res, size, mode="bilinear", align_corners=True)
        level = torch.tensor([noise_level] * upscaled.shape[0], device=upscaled.device)
        if not redraw:
            noise = randn_tensor(upscaled.shape, generator=generator, device=upscaled.device, dtype=upscaled.dtype)
            upscaled = self.image_noising_scheduler.add_noise(upscaled, noise, timesteps=level)
        # one copy per guidance half, made once per call rather than at every step
        conditioning.upscaled = torch.cat([upscaled] * conditioning.copies)
        conditioning.noise_level = torch.cat([level] * conditioning.copies)
        conditioning.redraw_augmentation, conditioning.generator = redraw, generator
        if consistency is not None:
            reference = F.interpolate(low_res, size, mode="bicubic", align_corners=False).clamp(-1, 1)
            conditioning.low_res_reference, conditioning.low_res_consistency = reference, consistency
        return conditioning

    def _check_low_res_consistency(self, factor: int | None, late_factor: int | None, late_timestep: int | None,
                                   size: tuple[int, int]) -> LowResConsistency | None:  # fmt: skip
        """The `low_res_consistency_*` arguments checked for output `size` and this pipeline's scheduler
        (`checks.check_low_res_consistency`)."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        return check_low_res_consistency(factor, late_factor, late_timestep, size, num_train_timesteps)

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        parameters = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in parameters else {}
        if "generator" in parameters:
            kwargs["generator"] = generator
        if "use_clipped_model_output" in parameters:
            # DDIM re-derives the noise from the thresholded x0, as the original's ddim_sample does.
            kwargs["use_clipped_model_output"] = True
        return kwargs

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """diffusers' attention slicing; `None` (what `disable_attention_slicing()` passes) switches it off and, unlike
        diffusers, restores the SDPA attention processors rather than the slower plain ones, for any UNet class."""
        super().enable_attention_slicing(slice_size)
        for component in self.components.values():
            if isinstance(component, torch.nn.Module) and hasattr(component, "set_attention_slice"):
                restore_sdpa_processors(component)

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

        No host synchronisation per step: no `.item()`, no Python branch on tensor values. DDPM, IF's scheduler,
        steps through `SyncFreeDDPMStep` (diffusers' step syncs 11 times per step on CUDA); other schedulers' own
        `step` may still sync (measured on CUDA per step: DDIM and UniPC 5; DPM-Solver, Euler and Heun none).
        """
        self._num_timesteps = len(timesteps)
        uses_variance = takes_learned_variance(self.scheduler)  # else keep the noise channels only
        # diffusers' LMS takes order min(step_index + 1, 4), more than the derivatives it holds when img2img starts
        # inside the schedule (its first steps then go wrong): cap the order by what it holds.
        caps_lms_order = isinstance(self.scheduler, LMSDiscreteScheduler)
        text_cache = self.unet.text_cache() if hasattr(self.unet, "text_cache") else contextlib.nullcontext()
        prompt_embeds = conditioning.prompt_embeds
        if conditioning.redraw_augmentation:  # the schedule to the device now: its first copy inside the loop syncs
            noising = self.image_noising_scheduler
            noising.alphas_cumprod = noising.alphas_cumprod.to(images.device)
        if conditioning.low_res_reference is not None:
            consistency_factors = conditioning.low_res_consistency.step_factors(timesteps)
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
                if caps_lms_order:  # the count of derivatives is host-side: no sync
                    step_kwargs["order"] = min(len(self.scheduler.derivatives) + 1, LMS_ORDER)
                if self._sync_free_step is not None:  # DDPM (IF's scheduler), the same samples without host reads
                    images = self._sync_free_step.step(i, noise_pred, images, step_kwargs.get("generator"))
                else:
                    images = self.scheduler.step(noise_pred, t, images, **step_kwargs, return_dict=False)[0]
                if conditioning.low_res_reference is not None:
                    images = self._held_to_low_res(
                        images, conditioning, timesteps[i + 1 : i + 2], consistency_factors[i]
                    )
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
        low_res = conditioning.upscaled
        if not conditioning.redraw_augmentation:
            return low_res
        generator, copies = conditioning.generator, conditioning.copies
        if isinstance(generator, list):
            # one generator per image draws that image's k copies, as the image alone would: (k, B, 3, H, W) -> (k*B, ...)
            per_image = (copies, *low_res.shape[1:])
            noise = torch.stack([randn_tensor(per_image, generator=g, device=low_res.device, dtype=low_res.dtype)
                                 for g in generator], dim=1).flatten(0, 1)  # fmt: skip
        else:
            noise = randn_tensor(low_res.shape, generator=generator, device=low_res.device, dtype=low_res.dtype)
        return self.image_noising_scheduler.add_noise(low_res, noise, conditioning.noise_level)

    def _held_to_low_res(
        self, images: torch.Tensor, conditioning: Conditioning, next_t: torch.Tensor, factor: int
    ) -> torch.Tensor:
        """`images` `(B, 3, H, W)`, just stepped to `next_t` (`(1,)`, or empty after the last step), with their
        content coarser than `factor` pixels replaced by the low-res reference's diffused to the same step (ILVR,
        Choi et al. 2021)."""
        reference = conditioning.low_res_reference
        if len(next_t):
            noise = randn_tensor(reference.shape, generator=conditioning.generator, device=reference.device,
                                 dtype=reference.dtype)  # fmt: skip
            reference = self.scheduler.add_noise(reference, noise, next_t.repeat(reference.shape[0]))
        return low_res_consistency(images, reference, factor)

    @staticmethod
    def _legacy_callback(callback: Callable | None, callback_steps: int | None) -> None:
        """The old `callback(step, t, images)` every `callback_steps` still runs, with diffusers' FutureWarning for
        each of the two arguments given, as its Stable Diffusion pipelines word it."""
        for name, given in (("callback", callback is not None), ("callback_steps", callback_steps != 1)):
            if given:
                deprecate(
                    name, "1.0.0",
                    f"Passing `{name}` as an input argument to `__call__` is deprecated, consider using "
                    "`callback_on_step_end`",
                )  # fmt: skip

    # --- output -----------------------------------------------------------------------------------------------

    def _finish(self, images: torch.Tensor, output_type: str, return_dict: bool, dtype: torch.dtype):
        """Safety checker (on every output type), conversion, watermark (PIL), offload hooks."""
        nsfw_detected, watermark_detected = check_safety(self, images, dtype)
        images = black_out(images, nsfw_detected, watermark_detected)
        result = to_output_images(self, images, output_type, self.unet.config.sample_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result, nsfw_detected, watermark_detected
        return IFPipelineOutput(images=result, nsfw_detected=nsfw_detected, watermark_detected=watermark_detected)
