"""The whole IF cascade in one call: prompt -> stage I (64px) -> stage II (x4, 256px) -> stage III (x4, 1024px: the
Stable Diffusion x4 upscaler, from diffusers' own components), for text-to-image, img2img and inpainting.

Each stage runs the stage pipeline of its mode over the shared components (no weights copied): the prompt is encoded
once with T5 for stages I and II, tensors pass between stages in `[-1, 1]` (no PIL round trips), and every argument of
every stage is checked before the first model runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    PipelineQuantizationConfig,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.deepfloyd_if import IFSafetyChecker, IFWatermarker
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ..image_processing import to_image_tensor
from ..installed_versions import CLIPImageProcessor
from ..models import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from .cascade_inputs import (
    MODE_DEFAULTS,
    STAGE_3_MAX_NOISE_LEVEL,
    check_flags,
    mode_inputs,
    stage_3_texts,
    stage_arguments,
    stage_images,
    stage_sizes,
    stage_steps,
)
from .cascade_stages import check_cascade_components, check_stage_configs, load_stage, read_stage_config
from .checks import (
    check_batch,
    check_common_inputs,
    check_noise_level,
    check_strength,
    check_timesteps,
)
from .compilation import CompileMixin
from .conditioning import DEFAULT_MAX_SEQUENCE_LENGTH
from .hub_layout import HubLayoutMixin
from .output import (
    IFCascadePipelineOutput,
    black_out,
    check_safety,
    register_with_safety_components,
    to_output_images,
)
from .pipeline_if import IFPipeline
from .pipeline_if_img2img import IFImg2ImgPipeline
from .pipeline_if_img2img_superresolution import IFImg2ImgSuperResolutionPipeline
from .pipeline_if_inpainting import IFInpaintingPipeline
from .pipeline_if_inpainting_superresolution import IFInpaintingSuperResolutionPipeline
from .pipeline_if_superresolution import IFSuperResolutionPipeline
from .stage_quantization import stage_quantization_configs

STAGE_3_COMPONENTS = ("stage_3_tokenizer", "stage_3_text_encoder", "stage_3_unet", "stage_3_vae", "stage_3_scheduler",
                      "stage_3_low_res_scheduler")  # fmt: skip
STAGE_3_IN_CHANNELS = 7  # 4 latent channels + the 3-channel low-res image


class _ThreadCalls(threading.local):
    def __init__(self):
        self.ids: set[int] = set()


STAGE_PIPELINES = {
    "text2img": (IFPipeline, IFSuperResolutionPipeline),
    "img2img": (IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline),
    "inpaint": (IFInpaintingPipeline, IFInpaintingSuperResolutionPipeline),
}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from if_diffusers import IFCascadePipeline

        >>> pipe = IFCascadePipeline.from_pretrained_stages(
        ...     "DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-II-L-v1.0", "stabilityai/stable-diffusion-x4-upscaler",
        ...     variant="fp16", torch_dtype=torch.float16,
        ... )
        >>> pipe.enable_model_cpu_offload()
        >>> image = pipe("a photo of a kangaroo holding a sign that says 'very deep learning'").images[0]  # 1024x1024
        ```
"""


class IFCascadePipeline(CompileMixin, HubLayoutMixin, DiffusionPipeline):
    """DeepFloyd IF from a prompt to the final image in one call: stage I, stage II and, when its components are
    there, stage III (the Stable Diffusion x4 upscaler). Text-to-image by default; `image` makes it img2img (the
    original's style transfer), `image` and `mask_image` inpainting.

    Components: the T5 `tokenizer`/`text_encoder` shared by stages I and II; `stage_1_unet`/`stage_1_scheduler`;
    `stage_2_unet`/`stage_2_scheduler`/`stage_2_image_noising_scheduler`; the optional x4 upscaler's
    `stage_3_tokenizer`/`stage_3_text_encoder` (CLIP), `stage_3_unet`, `stage_3_vae`, `stage_3_scheduler`,
    `stage_3_low_res_scheduler`; IF's `safety_checker`/`feature_extractor`/`watermarker`, applied to the final images.
    """

    model_cpu_offload_seq = "text_encoder->stage_1_unet->stage_2_unet->stage_3_text_encoder->stage_3_unet->stage_3_vae"
    _optional_components = ["tokenizer", "text_encoder", *STAGE_3_COMPONENTS, "safety_checker", "feature_extractor",
                            "watermarker"]  # fmt: skip
    _exclude_from_cpu_offload = ["watermarker"]

    def __init__(
        self,
        tokenizer: T5Tokenizer | None,
        text_encoder: T5EncoderModel | None,
        stage_1_unet: IFUNet2DConditionModel | UNet2DConditionModel,
        stage_1_scheduler: DDPMScheduler,
        stage_2_unet: IFSuperResUNet2DConditionModel | UNet2DConditionModel,
        stage_2_scheduler: DDPMScheduler,
        stage_2_image_noising_scheduler: DDPMScheduler,
        stage_3_tokenizer: CLIPTokenizer | None = None,
        stage_3_text_encoder: CLIPTextModel | None = None,
        stage_3_unet: UNet2DConditionModel | None = None,
        stage_3_vae: AutoencoderKL | None = None,
        stage_3_scheduler: SchedulerMixin | None = None,
        stage_3_low_res_scheduler: DDPMScheduler | None = None,
        safety_checker: IFSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        watermarker: IFWatermarker | None = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        stage_3 = dict(stage_3_tokenizer=stage_3_tokenizer, stage_3_text_encoder=stage_3_text_encoder,
                       stage_3_unet=stage_3_unet, stage_3_vae=stage_3_vae, stage_3_scheduler=stage_3_scheduler,
                       stage_3_low_res_scheduler=stage_3_low_res_scheduler)  # fmt: skip
        check_cascade_components(text_encoder, stage_1_unet, stage_2_unet, stage_3)
        register_with_safety_components(
            self, requires_safety_checker, tokenizer=tokenizer, text_encoder=text_encoder, stage_1_unet=stage_1_unet,
            stage_1_scheduler=stage_1_scheduler, stage_2_unet=stage_2_unet, stage_2_scheduler=stage_2_scheduler,
            stage_2_image_noising_scheduler=stage_2_image_noising_scheduler, **stage_3,
            safety_checker=safety_checker, feature_extractor=feature_extractor, watermarker=watermarker,
        )  # fmt: skip

    # --- building it --------------------------------------------------------------------------------------------

    @classmethod
    def from_stages(
        cls,
        stage_1: DiffusionPipeline,
        stage_2: DiffusionPipeline,
        stage_3: StableDiffusionUpscalePipeline | None = None,
    ) -> IFCascadePipeline:
        """A cascade over already-loaded stage pipelines, sharing their components (nothing is copied).

        Args:
            stage_1: a stage-I pipeline (ours or diffusers' `IFPipeline` family); its T5 and safety components are
                the cascade's (stage 2's T5 is used when stage 1 has none).
            stage_2: a super-resolution pipeline (`IFSuperResolutionPipeline` family).
            stage_3: a `StableDiffusionUpscalePipeline`, or `None` to stop after stage II.
        """
        for argument, stage, needs in (("stage_1", stage_1, ("unet", "scheduler")),
                                       ("stage_2", stage_2, ("unet", "scheduler", "image_noising_scheduler")),
                                       ("stage_3", stage_3, ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                             "low_res_scheduler"))):  # fmt: skip
            missing = [n for n in needs if stage is not None and getattr(stage, n, None) is None]
            if missing:
                raise ValueError(
                    f"{argument} ({type(stage).__name__}) lacks {missing}; expected a {argument} pipeline"
                )
        text_source = stage_1 if stage_1.text_encoder is not None else stage_2
        stage_3_components = {} if stage_3 is None else {
            "stage_3_tokenizer": stage_3.tokenizer, "stage_3_text_encoder": stage_3.text_encoder,
            "stage_3_unet": stage_3.unet, "stage_3_vae": stage_3.vae, "stage_3_scheduler": stage_3.scheduler,
            "stage_3_low_res_scheduler": stage_3.low_res_scheduler,
        }  # fmt: skip
        return cls(
            tokenizer=text_source.tokenizer, text_encoder=text_source.text_encoder, stage_1_unet=stage_1.unet,
            stage_1_scheduler=stage_1.scheduler, stage_2_unet=stage_2.unet, stage_2_scheduler=stage_2.scheduler,
            stage_2_image_noising_scheduler=stage_2.image_noising_scheduler, **stage_3_components,
            safety_checker=getattr(stage_1, "safety_checker", None),
            feature_extractor=getattr(stage_1, "feature_extractor", None),
            watermarker=getattr(stage_1, "watermarker", None),
            requires_safety_checker=getattr(stage_1.config, "requires_safety_checker", True),
        )  # fmt: skip

    @classmethod
    def from_pretrained_stages(
        cls,
        stage_1: str | os.PathLike,
        stage_2: str | os.PathLike,
        stage_3: str | os.PathLike | None = None,
        quantization_config: PipelineQuantizationConfig | None = None,
        **kwargs,
    ) -> IFCascadePipeline:
        """Load the cascade from three stage folders or hub ids, without copying weights: T5 is loaded once, from
        stage 1, and shared. Stage III's sampler becomes `DDPMScheduler` (from its config), as the original IF runs
        the x4 upscaler. The stages' configs are checked (kind of stage, T5 widths) before any weights load.

        Args:
            stage_1: e.g. "DeepFloyd/IF-I-XL-v1.0", or a folder in that layout (ours or diffusers').
            stage_2: e.g. "DeepFloyd/IF-II-L-v1.0".
            stage_3: e.g. "stabilityai/stable-diffusion-x4-upscaler", or `None` to stop after stage II.
            quantization_config: diffusers' `PipelineQuantizationConfig` naming the cascade's components, as for
                `from_pretrained`: `{"text_encoder": ...}` quantizes T5 (not stage III's CLIP, which is
                `stage_3_text_encoder`); each stage loads with its share (`stage_quantization_configs`).
            kwargs: passed to every stage's `from_pretrained` (`torch_dtype`, `variant`, `token`, ...).
        """
        stages = ("stage_1", "stage_2") + (("stage_3",) if stage_3 is not None else ())
        quantization = stage_quantization_configs(quantization_config, stages)
        configs = {name: read_stage_config(name, source, kwargs)
                   for name, source in (("stage_1", stage_1), ("stage_2", stage_2), ("stage_3", stage_3))
                   if source is not None}  # fmt: skip
        check_stage_configs(configs)
        first = load_stage("stage_1", IFPipeline, stage_1, {**kwargs, **quantization["stage_1"]})
        second = load_stage("stage_2", IFSuperResolutionPipeline, stage_2,
                             {**kwargs, **quantization["stage_2"], "tokenizer": None, "text_encoder": None,
                              "safety_checker": None, "feature_extractor": None, "watermarker": None,
                              "requires_safety_checker": False})  # fmt: skip
        third = None
        if stage_3 is not None:
            third = load_stage("stage_3", StableDiffusionUpscalePipeline, stage_3,
                                {**kwargs, **quantization["stage_3"], "safety_checker": None, "feature_extractor": None,
                                 "watermarker": None})  # fmt: skip
            third.scheduler = DDPMScheduler.from_config(third.scheduler.config)
        return cls.from_stages(first, second, third)

    @property
    def has_stage_3(self) -> bool:
        return self.stage_3_unet is not None

    _checks_only_calls = _ThreadCalls()  # the cascades whose check_inputs runs in this thread

    def check_inputs(self, *args, **kwargs) -> None:
        """The checks `__call__` makes of these arguments (the same ones, e.g. `pipe.check_inputs("a prompt",
        stage_1_guidance_scale=5)`) before its first model runs, without running one: a `ValueError` naming the
        argument for the first bad one, else `None`. Checks a batch of calls before the first image is made."""
        self._checks_only_calls.ids.add(id(self))  # per thread: a call in another thread meanwhile runs in full
        try:
            self(*args, **kwargs)
        finally:
            self._checks_only_calls.ids.discard(id(self))

    # --- the call -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        mask_image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        *,
        max_sequence_length: int | None = DEFAULT_MAX_SEQUENCE_LENGTH,
        stage_1_timesteps: str | list[int] | None = None,
        stage_1_num_inference_steps: int | None = None,
        stage_1_guidance_scale: float | None = None,
        stage_1_strength: float = 1.0,
        stage_2_timesteps: str | list[int] | None = None,
        stage_2_num_inference_steps: int | None = None,
        stage_2_guidance_scale: float | None = None,
        stage_2_strength: float = 1.0,
        stage_2_noise_level: int | None = None,
        stage_2_redraw_augmentation_noise: bool = True,
        stage_2_low_res_consistency_factor: int | None = None,
        stage_2_low_res_consistency_late_factor: int | None = None,
        stage_2_low_res_consistency_late_timestep: int | None = None,
        stage_3_prompt: str | list[str] | None = None,
        stage_3_num_inference_steps: int = 75,
        stage_3_guidance_scale: float = 9.0,
        stage_3_noise_level: int = 20,
        keep_unmasked_pixels: bool = True,
        return_intermediates: bool = False,
        last_stage: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("intermediate_images",),
    ):
        """Generate final images from text: stage I, II and (when present) III in turn.

        Per-stage settings default (`None`) to the original IF's, for the mode: text-to-image stage I "smart100"
        guidance 7, stage II "smart50" guidance 4 noise level 250; img2img stage I "10,10,10,10,10,10,10,10,0,0"
        guidance 10, stage II "smart50" guidance 4 noise level 250; inpainting stage I "10,10,10,10,10,0,0,0,0,0"
        guidance 7, stage II "100" guidance 4 noise level 0; stage III 75 DDPM steps, guidance 9, noise level 20.

        Args:
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds: as in `IFPipeline`; encoded once with T5
                for stages I and II. Stage III encodes the text prompt (and negative prompt) with its CLIP encoder.
            image: img2img / inpainting source, one per prompt, any size (PIL, or arrays/tensors in `[-1, 1]`):
                resized (bicubic, antialiased) to each stage's size, the short side to stage I's `sample_size` as the
                original's `_prepare_pil_image`.
            mask_image: with `image`, inpainting: 1 where to repaint, at `image`'s size (1 or one per prompt);
                resized to each stage's size and binarised at 0.5, as the original does.
            num_images_per_prompt, generator (one, or one per image), output_type ("pil", "np", "pt": `(B, 3, H,
                W)` in `[-1, 1]`), return_dict, clean_caption, max_sequence_length: as in `IFPipeline`.
            height, width: text-to-image stage I size (default `stage_1_unet.config.sample_size`); later stages x4.
            stage_1_timesteps, stage_2_timesteps: respacing presets, section strings or lists (`IFPipeline`);
                `stage_N_num_inference_steps` instead takes evenly spaced DDPM steps.
            stage_1_guidance_scale, stage_2_guidance_scale, stage_3_guidance_scale: guidance weights per stage.
            stage_1_strength, stage_2_strength: img2img / inpainting share of the timesteps run, in `(0, 1]` (1: the
                whole preset, as the original, whose img2img presets already skip the noisiest timesteps); text-to-image
                takes 1 only.
            stage_2_noise_level: augmentation of stage I's images, in `[0, 1000)` (the original's `aug_level * 1000`).
            stage_2_redraw_augmentation_noise: redraw that augmentation at every step, as the original does.
            stage_2_low_res_consistency_factor: hold stage II's samples to stage I's images at this scale (ILVR;
                `IFSuperResolutionPipeline.__call__`); `None`: off, as the original.
            stage_2_low_res_consistency_late_factor, stage_2_low_res_consistency_late_timestep: that scale instead
                for stage II's steps that end below the timestep (`IFSuperResolutionPipeline.__call__`).
            stage_3_prompt: stage III's text when `prompt` is not given as text (default: `prompt`).
            stage_3_num_inference_steps, stage_3_noise_level (in `[0, 350]`): the x4 upscaler's settings.
            keep_unmasked_pixels: inpainting with stage III: paste `image`'s pixels outside the mask back into the
                final images (the x4 upscaler has no inpainting mode; stages I and II keep them by construction).
            return_intermediates: also return the images of stages I (and II, when stage III ran).
            last_stage: stop after this stage (1, 2 or, with stage III, 3) and return its images: `last_stage=1`
                draws stage I candidates to choose from before upscaling one (the same images as stage I's of a full
                call with the same generators). Default: every stage the cascade has.
            callback_on_step_end, callback_on_step_end_tensor_inputs: called at every step of stages I and II with
                the stage pipeline that runs as first argument (`IFPipeline.__call__`). Setting its `_interrupt`
                (diffusers' way to stop a call) ends that stage's loop and the cascade after it: the images of that
                stage so far are returned, and `pipe.interrupt` reads `True` until the next call.

        Examples:

        Returns: `IFCascadePipelineOutput(images, nsfw_detected, watermark_detected, stage_1_images,
            stage_2_images)` or, with `return_dict=False`, the tuple of its non-`None` fields.
        """
        mode = "text2img" if image is None else "img2img" if mask_image is None else "inpaint"
        if mask_image is not None and image is None:
            raise ValueError("mask_image was given without image: inpainting needs the image to repaint")
        stage_1, stage_2, stage_3 = self._stage_pipelines(mode)
        defaults = MODE_DEFAULTS[mode]
        steps_1 = stage_steps(1, stage_1_timesteps, stage_1_num_inference_steps, defaults.stage_1_timesteps)
        steps_2 = stage_steps(2, stage_2_timesteps, stage_2_num_inference_steps, defaults.stage_2_timesteps)
        guidance_1 = _default(stage_1_guidance_scale, defaults.stage_1_guidance_scale)
        guidance_2 = _default(stage_2_guidance_scale, defaults.stage_2_guidance_scale)
        noise_level_2 = _default(stage_2_noise_level, defaults.stage_2_noise_level)

        # --- every check, before any model runs ---
        check_flags(clean_caption=clean_caption, stage_2_redraw_augmentation_noise=stage_2_redraw_augmentation_noise,
                    keep_unmasked_pixels=keep_unmasked_pixels, return_intermediates=return_intermediates)  # fmt: skip
        batch_size = check_common_inputs(
            stage_1, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            output_type, 1, callback_on_step_end_tensor_inputs, max_sequence_length, generator=generator,
            guidance_scale=1.0,  # each stage's guidance is checked below
        )  # fmt: skip
        img2img = mode != "text2img"
        for stage, pipeline, guidance, steps, strength in ((1, stage_1, guidance_1, steps_1, stage_1_strength),
                                                           (2, stage_2, guidance_2, steps_2, stage_2_strength)):  # fmt: skip
            with stage_arguments(stage):
                check_common_inputs(pipeline, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, 1,
                                    output_type, 1, callback_on_step_end_tensor_inputs, max_sequence_length,
                                    guidance_scale=guidance)  # fmt: skip
                if img2img:
                    check_strength(strength)
                elif isinstance(strength, bool) or strength != 1.0:  # True == 1.0, but is no strength
                    raise ValueError(f"strength={strength!r} applies to img2img and inpainting (with image); "
                                     "text-to-image runs every stage from noise: leave it at 1.0")  # fmt: skip
                check_timesteps(pipeline.scheduler, steps.get("num_inference_steps"), steps.get("timesteps"),
                                strength if img2img else None)  # fmt: skip
                if stage == 2:
                    check_noise_level(noise_level_2, self.stage_2_image_noising_scheduler)
        stage_3_prompts = stage_3_texts(self.has_stage_3, prompt, stage_3_prompt, negative_prompt, batch_size,
                                            num_images_per_prompt, stage_3_num_inference_steps,
                                            stage_3_guidance_scale, stage_3_noise_level)  # fmt: skip
        source = None if image is None else to_image_tensor(image, "image")
        if source is not None:
            check_batch("image", source.shape[0], batch_size)
        sizes = stage_sizes(self.stage_1_unet, self.stage_2_unet, self.has_stage_3, source, height, width)
        with stage_arguments(2):
            stage_2._check_low_res_consistency(stage_2_low_res_consistency_factor,
                                               stage_2_low_res_consistency_late_factor,
                                               stage_2_low_res_consistency_late_timestep, sizes[1])  # fmt: skip
        sources, masks = stage_images(source, mask_image, sizes, batch_size, num_images_per_prompt)
        stages_run = check_last_stage(last_stage, 3 if self.has_stage_3 else 2)
        if id(self) in self._checks_only_calls.ids:
            return None
        self._interrupt = False

        # --- T5 once, for stages I and II ---
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = stage_1.encode_prompt(
            prompt, max(guidance_1, guidance_2) > 1, num_images_per_prompt, device, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clean_caption, max_sequence_length,
        )  # fmt: skip
        shared = dict(num_images_per_prompt=1, generator=generator, output_type="pt", callback_on_step_end=callback_on_step_end,
                      callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)  # fmt: skip

        images_1 = stage_1(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=_if_guided(negative_prompt_embeds, guidance_1),
            guidance_scale=guidance_1, **steps_1, **mode_inputs(mode, sources[0], masks[0], stage_1_strength),
            **({} if img2img else {"height": sizes[0][0], "width": sizes[0][1]}), **shared,
        ).images  # fmt: skip
        if self._stopped(stage_1) or stages_run == 1:
            return self._finish(images_1, [], output_type, return_dict, return_intermediates)
        images_2 = stage_2(
            image=images_1, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=_if_guided(negative_prompt_embeds, guidance_2), guidance_scale=guidance_2,
            noise_level=noise_level_2, redraw_augmentation_noise=stage_2_redraw_augmentation_noise,
            low_res_consistency_factor=stage_2_low_res_consistency_factor,
            low_res_consistency_late_factor=stage_2_low_res_consistency_late_factor,
            low_res_consistency_late_timestep=stage_2_low_res_consistency_late_timestep, **steps_2,
            **mode_inputs(mode, sources[1], masks[1], stage_2_strength, original=True),
            **({} if img2img else {"height": sizes[1][0], "width": sizes[1][1]}), **shared,
        ).images  # fmt: skip
        intermediates = [images_1]
        final = images_2
        if not self._stopped(stage_2) and stage_3 is not None and stages_run == 3:
            intermediates.append(images_2)
            final = stage_3(
                prompt=stage_3_prompts[0], negative_prompt=stage_3_prompts[1], image=(images_2 + 1) / 2,
                num_inference_steps=stage_3_num_inference_steps, guidance_scale=stage_3_guidance_scale,
                noise_level=stage_3_noise_level, generator=generator, output_type="pt",
            ).images * 2 - 1  # fmt: skip  # [0, 1] -> [-1, 1]
            if mode == "inpaint" and keep_unmasked_pixels:
                final = torch.lerp(sources[2].to(final), final, masks[2].to(final))
        return self._finish(final, intermediates, output_type, return_dict, return_intermediates)

    @property
    def interrupt(self) -> bool:
        """Whether the last call was interrupted (a callback set its stage pipeline's `_interrupt`)."""
        return getattr(self, "_interrupt", False)

    # --- steps of the call --------------------------------------------------------------------------------------

    def _stage_components(self, stage: int) -> dict[str, Any]:
        """The components of stage `stage`'s pipeline (shared objects), without safety components: the cascade
        checks and watermarks its final images itself."""
        components = dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                          unet=getattr(self, f"stage_{stage}_unet"), scheduler=getattr(self, f"stage_{stage}_scheduler"),
                          safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)  # fmt: skip
        if stage == 2:
            components["image_noising_scheduler"] = self.stage_2_image_noising_scheduler
        return components

    def _stage_pipelines(self, mode: str) -> list[DiffusionPipeline | None]:
        """The mode's stage pipelines over the cascade's components (built per call, so that they always hold the
        current components), with the cascade's progress-bar settings; `None` for a missing stage III."""
        pipelines = [cls(**self._stage_components(n)) for n, cls in enumerate(STAGE_PIPELINES[mode], 1)]
        pipelines.append(None)
        if self.has_stage_3:
            pipelines[2] = StableDiffusionUpscalePipeline(
                vae=self.stage_3_vae, text_encoder=self.stage_3_text_encoder, tokenizer=self.stage_3_tokenizer,
                unet=self.stage_3_unet, low_res_scheduler=self.stage_3_low_res_scheduler,
                scheduler=self.stage_3_scheduler, max_noise_level=STAGE_3_MAX_NOISE_LEVEL,
            )  # fmt: skip
        for pipeline in pipelines[: 3 if self.has_stage_3 else 2]:
            pipeline.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipelines

    def _stopped(self, stage_pipeline: DiffusionPipeline) -> bool:
        self._interrupt = stage_pipeline.interrupt
        return self._interrupt

    def _finish(self, final: torch.Tensor, intermediates: list[torch.Tensor], output_type: str, return_dict: bool,
                return_intermediates: bool):  # fmt: skip
        """The safety checker on the final images; a flagged sample is blacked out in every stage's images."""
        nsfw_detected, watermark_detected = check_safety(self, final, final.dtype)
        final = to_output_images(self, black_out(final, nsfw_detected, watermark_detected), output_type, None)
        stages = [None, None]
        if return_intermediates:
            sample_sizes = (self.stage_1_unet.config.sample_size, self.stage_2_unet.config.sample_size)
            stages[: len(intermediates)] = [
                to_output_images(self, black_out(images, nsfw_detected, watermark_detected), output_type, size)
                for images, size in zip(intermediates, sample_sizes)
            ]
        self.maybe_free_model_hooks()
        output = IFCascadePipelineOutput(final, nsfw_detected, watermark_detected, *stages)
        return output if return_dict else output.to_tuple()


def check_last_stage(last_stage: int | None, stages: int) -> int:
    """The number of stages a call runs: `last_stage`, checked against the cascade's `stages`, or all of them."""
    if last_stage is None:
        return stages
    if isinstance(last_stage, bool) or not isinstance(last_stage, int) or not 1 <= last_stage <= stages:
        raise ValueError(f"last_stage={last_stage!r}: expected an int in [1, {stages}] (this cascade has {stages} "
                         "stages), or None for all of them")  # fmt: skip
    return last_stage


def _default(value, default):
    return default if value is None else value


def _if_guided(negative_prompt_embeds, guidance_scale: float):
    return negative_prompt_embeds if guidance_scale > 1 else None
