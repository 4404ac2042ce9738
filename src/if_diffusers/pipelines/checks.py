"""Input checks shared by the six stage pipelines: each raises `ValueError` naming the argument, what was given and
what is expected, before any model runs. Nothing is corrected silently."""

from __future__ import annotations

import inspect
import math
import numbers

import torch
from diffusers import PNDMScheduler

from ..text import preprocess_prompts
from ..timesteps import resolve_timesteps
from .conditioning import LowResConsistency

OUTPUT_TYPES = ("pil", "np", "pt")


def check_common_inputs(
    pipeline,
    prompt,
    negative_prompt,
    prompt_embeds,
    negative_prompt_embeds,
    num_images_per_prompt,
    output_type,
    callback_steps,
    callback_on_step_end_tensor_inputs,
    max_sequence_length,
    style_prompt=None,
    style_prompt_embeds=None,
    positive_prompt=None,
    positive_prompt_embeds=None,
    positive_mixer=None,
    guidance_scale=None,
    generator=None,
) -> int:
    """Validate what every stage takes (prompts, embeddings, guidance, output and callback arguments, generators);
    returns the prompt batch size, which images, masks and embeddings must match."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError(
            "pass exactly one of prompt and prompt_embeds; got " + ("both" if prompt is not None else "neither")
        )
    if prompt is not None and not (
        isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
    ):
        raise ValueError(f"prompt must be a str or a list of str; got {type(prompt).__name__}")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds; got both")
    if prompt_embeds is not None and not isinstance(prompt_embeds, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a tensor (batch, tokens, width); got {type(prompt_embeds).__name__}")
    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    _check_prompt_count("negative_prompt", negative_prompt, batch_size)
    _check_embeddings(pipeline, batch_size, prompt_embeds, negative_prompt_embeds, style_prompt_embeds,
                      positive_prompt_embeds, None if prompt_embeds is not None else max_sequence_length)  # fmt: skip
    for name, text, embeds in (("style_prompt", style_prompt, style_prompt_embeds),
                               ("positive_prompt", positive_prompt, positive_prompt_embeds)):  # fmt: skip
        if text is not None and embeds is not None:
            raise ValueError(f"pass at most one of {name} and {name}_embeds; got both")
        _check_prompt_count(name, text, batch_size)
    check_guidance_scale("guidance_scale", guidance_scale)
    if (positive_prompt is not None or positive_prompt_embeds is not None) and not (guidance_scale or 0) > 1:
        raise ValueError(
            f"positive_prompt mixes guided predictions: it needs guidance_scale > 1; got {guidance_scale}"
        )
    if positive_mixer is not None and (not isinstance(positive_mixer, numbers.Real) or not 0 <= positive_mixer <= 1):
        raise ValueError(f"positive_mixer={positive_mixer!r}: expected a weight in [0, 1]")
    if (style_prompt is not None or style_prompt_embeds is not None) and not hasattr(pipeline.unet, "text_cache"):
        raise ValueError(
            f"style_prompt needs a UNet with a separate pooled-text input; {type(pipeline.unet).__name__} has none: "
            "load the UNet as if_diffusers.IFUNet2DConditionModel / IFSuperResUNet2DConditionModel"
        )
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r}: expected a positive int")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
    if isinstance(callback_steps, bool) or not isinstance(callback_steps, int) or callback_steps <= 0:
        raise ValueError(f"callback_steps={callback_steps!r}: expected a positive int")
    exposed = pipeline._callback_tensor_inputs
    if isinstance(callback_on_step_end_tensor_inputs, str):
        raise ValueError(
            f"callback_on_step_end_tensor_inputs={callback_on_step_end_tensor_inputs!r}: expected a list of names "
            f"from {exposed}"
        )
    unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in exposed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs names {unknown}; this pipeline exposes {exposed}")
    if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or max_sequence_length < 1):
        raise ValueError(f"max_sequence_length={max_sequence_length!r}: expected a positive int or None")
    if isinstance(generator, list) and len(generator) != batch_size * num_images_per_prompt:
        raise ValueError(
            f"generator is a list of {len(generator)}; expected one per image: {batch_size * num_images_per_prompt} "
            f"(batch {batch_size} x num_images_per_prompt {num_images_per_prompt})"
        )
    return batch_size


def check_guidance_scale(name: str, guidance_scale) -> None:
    """A finite number: NaN or infinity would turn every guided prediction into NaN."""
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, numbers.Real)
        or not math.isfinite(guidance_scale)
    ):
        raise ValueError(f"{name}={guidance_scale!r}: expected a finite number (> 1 enables guidance)")


def _is_int(value) -> bool:
    """An integer, and not a bool (`True` is an `int` in Python, never a meant count or level)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_prompt_count(name: str, text, batch_size: int) -> None:
    """An extra prompt (negative, style, positive): None, or a str / list of str with one prompt per prompt."""
    if text is None:
        return
    if not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
        raise ValueError(f"{name} must be a str or a list of str; got {type(text).__name__}")
    count = len(preprocess_prompts(text, False))
    if count != batch_size:
        raise ValueError(f"{name} has {count} prompt(s); expected {batch_size}, one per prompt")


def _check_embeddings(pipeline, batch_size: int, prompt_embeds, negative_prompt_embeds, style_prompt_embeds,
                      positive_prompt_embeds, max_sequence_length: int | None) -> None:  # fmt: skip
    """T5 embeddings `(B, L, D)`: `D` the UNet's text width, `B` the prompt batch, and one token count `L` (that of
    `prompt_embeds`, or `max_sequence_length` when the prompt is encoded here) so that the batches can be stacked."""
    width = pipeline.unet.config.encoder_hid_dim or pipeline.unet.config.cross_attention_dim
    tokens = prompt_embeds.shape[1] if prompt_embeds is not None and prompt_embeds.ndim == 3 else max_sequence_length
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds),
                         ("style_prompt_embeds", style_prompt_embeds), ("positive_prompt_embeds", positive_prompt_embeds)):  # fmt: skip
        if embeds is None:
            continue
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            given = f"shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"{name} has {given}; expected a tensor (batch, tokens, {width}) for this UNet's text width"
            )
        if embeds.shape[0] != batch_size:
            raise ValueError(f"{name} has batch {embeds.shape[0]}; expected {batch_size}, the prompt batch size")
        if tokens is not None and embeds.shape[1] != tokens:
            like = "prompt_embeds" if prompt_embeds is not None else "max_sequence_length"
            raise ValueError(f"{name} has {embeds.shape[1]} tokens; expected {tokens} like {like}")


def check_strength(strength: float) -> None:
    """img2img / inpainting `strength`: the share of the timesteps run, in `(0, 1]` (0 would run none)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r}: expected a number in (0, 1]")


def check_noise_level(noise_level: int, image_noising_scheduler) -> None:
    """Super-resolution `noise_level`: an integer timestep of the image-noising scheduler."""
    levels = image_noising_scheduler.config.num_train_timesteps
    if not _is_int(noise_level) or not 0 <= noise_level < levels:
        raise ValueError(f"noise_level={noise_level!r}: expected an int in [0, {levels}) (image_noising_scheduler)")


def check_low_res_consistency(factor: int | None, late_factor: int | None, late_timestep: int | None,
                              size: tuple[int, int], num_train_timesteps: int) -> LowResConsistency | None:  # fmt: skip
    """Super-resolution `low_res_consistency_factor` (`None`: off, or an int >= 2 dividing the output `size`),
    `low_res_consistency_late_factor` (`None`, or such an int, with a factor) and `low_res_consistency_late_timestep`
    (an int in `[1, num_train_timesteps)`, given with a late factor and only then). Returns them together, or `None`
    when the consistency is off."""
    for name, value in (("low_res_consistency_factor", factor), ("low_res_consistency_late_factor", late_factor)):
        if value is not None and (not _is_int(value) or value < 2 or size[0] % value or size[1] % value):
            raise ValueError(
                f"{name}={value!r}: expected None or an int >= 2 dividing the output size {size} (4 holds a x4 "
                "stage's output to what its low-res input says)"
            )
    if late_factor is not None and factor is None:
        raise ValueError(
            f"low_res_consistency_late_factor={late_factor!r} was given with low_res_consistency_factor=None; expected "
            "a low_res_consistency_factor for the steps before low_res_consistency_late_timestep"
        )
    if (late_factor is None) != (late_timestep is None):
        raise ValueError(
            f"low_res_consistency_late_timestep={late_timestep!r} and low_res_consistency_late_factor="
            f"{late_factor!r}: expected both (the late factor applies to the steps that end below that timestep) or neither"
        )
    if late_timestep is not None and (not _is_int(late_timestep) or not 1 <= late_timestep < num_train_timesteps):
        raise ValueError(
            f"low_res_consistency_late_timestep={late_timestep!r}: expected an int in [1, {num_train_timesteps}) "
            "(the scheduler's num_train_timesteps)"
        )
    return None if factor is None else LowResConsistency(factor, late_factor, late_timestep)


def check_timesteps(scheduler, num_inference_steps: int, timesteps, strength: float | None = None) -> list[int] | None:
    """`timesteps` (a preset name, a section string or a list) or else `num_inference_steps`, checked before any
    model runs: the scheduler must take custom timesteps, and `strength` must keep at least one of them. Returns the
    resolved timesteps (descending integers), or `None` when `num_inference_steps` applies."""
    steps = resolve_timesteps(timesteps, scheduler.config.num_train_timesteps)
    if steps is not None and "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(
            f"timesteps={timesteps!r}: {type(scheduler).__name__} cannot take custom timesteps; use "
            "num_inference_steps, or a scheduler that can (DDPMScheduler, DPMSolverMultistepScheduler, ...)"
        )
    if steps is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected a positive int")
    count = len(steps) if steps is not None else num_inference_steps
    if strength is not None and int(count * strength) == 0:  # diffusers' get_timesteps keeps int(count * strength)
        raise ValueError(
            f"strength={strength} keeps int({count} * {strength}) = 0 of {count} steps; expected strength >= 1/{count}, "
            "or more steps"
        )
    if strength is not None and int(count * strength) < count and isinstance(scheduler, PNDMScheduler):
        raise ValueError(
            f"strength={strength} starts inside the schedule, which PNDMScheduler cannot do (its warm-up assumes the "
            "first timesteps); use another scheduler (DDPMScheduler, DDIMScheduler, ...) or strength=1"
        )
    return steps


def check_batch(name: str, count: int, batch_size: int, allow_one: bool = False) -> None:
    """Images (or masks, `allow_one`: one shared by all) come one per prompt."""
    if count != batch_size and not (allow_one and count == 1):
        expected = f"1 or {batch_size}" if allow_one else f"{batch_size}"
        raise ValueError(f"{name} has batch size {count}; expected {expected}, the prompt batch size")
