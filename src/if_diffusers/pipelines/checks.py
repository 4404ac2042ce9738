"""Input checks shared by the six stage pipelines: each raises `ValueError` naming the argument, what was given and
what is expected, before any model runs. Nothing is corrected silently."""

from __future__ import annotations

from ..text import preprocess_prompts

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
) -> int:
    """Validate what every stage takes; returns the prompt batch size."""
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
    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    width = pipeline.unet.config.encoder_hid_dim or pipeline.unet.config.cross_attention_dim
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds),
                         ("style_prompt_embeds", style_prompt_embeds), ("positive_prompt_embeds", positive_prompt_embeds)):  # fmt: skip
        if embeds is None:
            continue
        if embeds.ndim != 3 or embeds.shape[-1] != width:
            raise ValueError(
                f"{name} has shape {tuple(embeds.shape)}; expected (batch, tokens, {width}) for this UNet"
            )
        if embeds.shape[0] != batch_size:
            raise ValueError(f"{name} has batch {embeds.shape[0]}; expected {batch_size} like the prompt")
    if (
        negative_prompt_embeds is not None
        and prompt_embeds is not None
        and negative_prompt_embeds.shape != prompt_embeds.shape
    ):
        raise ValueError(
            f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}; expected prompt_embeds' "
            f"{tuple(prompt_embeds.shape)}"
        )
    for name, text, embeds in (("style_prompt", style_prompt, style_prompt_embeds),
                               ("positive_prompt", positive_prompt, positive_prompt_embeds)):  # fmt: skip
        if text is not None and embeds is not None:
            raise ValueError(f"pass at most one of {name} and {name}_embeds; got both")
        if text is not None and len(preprocess_prompts(text, False)) != batch_size:
            raise ValueError(f"{name} has {len(preprocess_prompts(text, False))} prompts; expected {batch_size}")
    if (positive_prompt is not None or positive_prompt_embeds is not None) and not (guidance_scale or 0) > 1:
        raise ValueError(
            f"positive_prompt mixes guided predictions: it needs guidance_scale > 1; got {guidance_scale}"
        )
    if positive_mixer is not None and not 0 <= positive_mixer <= 1:
        raise ValueError(f"positive_mixer={positive_mixer}: expected a weight in [0, 1]")
    if (style_prompt is not None or style_prompt_embeds is not None) and not hasattr(pipeline.unet, "text_cache"):
        raise ValueError(
            f"style_prompt needs a UNet with a separate pooled-text input; {type(pipeline.unet).__name__} has none: "
            "load the UNet as if_diffusers.IFUNet2DConditionModel / IFSuperResUNet2DConditionModel"
        )
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r}: expected a positive int")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
    if callback_steps is not None and (not isinstance(callback_steps, int) or callback_steps <= 0):
        raise ValueError(f"callback_steps={callback_steps!r}: expected a positive int")
    unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in pipeline._callback_tensor_inputs]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs names {unknown}; this pipeline exposes {pipeline._callback_tensor_inputs}"
        )
    if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or max_sequence_length < 1):
        raise ValueError(f"max_sequence_length={max_sequence_length!r}: expected a positive int or None")
    return batch_size


def check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r}: expected a value in (0, 1]")


def check_noise_level(noise_level: int, image_noising_scheduler) -> None:
    levels = image_noising_scheduler.config.num_train_timesteps
    if not isinstance(noise_level, int) or not 0 <= noise_level < levels:
        raise ValueError(f"noise_level={noise_level!r}: expected an int in [0, {levels}) (image_noising_scheduler)")


def check_batch(name: str, count: int, batch_size: int, allow_one: bool = False) -> None:
    if count != batch_size and not (allow_one and count == 1):
        expected = f"1 or {batch_size}" if allow_one else f"{batch_size}"
        raise ValueError(f"{name} has {count} images; expected {expected} like the prompt")
