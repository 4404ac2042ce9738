"""The per-call inputs of `IFCascadePipeline`, resolved and checked before any model runs: each mode's settings from
the original IF, each stage's steps, sizes, images and masks, and stage III's texts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..image_processing import check_size, size_multiple, super_resolution_size, to_mask_tensor
from .checks import check_batch, check_guidance_scale

STAGE_3_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's max_noise_level


@dataclass(frozen=True)
class ModeDefaults:
    """The original IF's settings of one mode, as its README runs `dream`, `style_transfer` and `inpainting`."""

    stage_1_timesteps: str
    stage_1_guidance_scale: float
    stage_2_timesteps: str
    stage_2_guidance_scale: float
    stage_2_noise_level: int  # the original's aug_level * 1000


MODE_DEFAULTS = {
    "text2img": ModeDefaults("smart100", 7.0, "smart50", 4.0, 250),
    "img2img": ModeDefaults("10,10,10,10,10,10,10,10,0,0", 10.0, "smart50", 4.0, 250),
    "inpaint": ModeDefaults("10,10,10,10,10,0,0,0,0,0", 7.0, "100", 4.0, 0),
}


def check_flags(**flags: Any) -> None:
    """Switches are `True` or `False`: a string such as "false" would read as on."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected True or False")


def stage_steps(stage: int, timesteps, num_inference_steps, preset) -> dict[str, Any]:
    """A stage pipeline's steps argument: explicit `timesteps`, else `num_inference_steps` evenly spaced steps,
    else the mode's preset."""
    if timesteps is not None and num_inference_steps is not None:
        raise ValueError(
            f"stage_{stage}_timesteps and stage_{stage}_num_inference_steps were both given; pass at most one"
        )
    if num_inference_steps is not None:
        return {"num_inference_steps": num_inference_steps}
    return {"timesteps": preset if timesteps is None else timesteps}


@contextlib.contextmanager
def stage_arguments(stage: int) -> Iterator[None]:
    """Name the stage in the errors of the stage pipelines' checks (they name the plain argument)."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"stage {stage} (the stage_{stage}_* arguments): {error}") from None


def mode_inputs(mode: str, source, mask, strength: float, original: bool = False) -> dict[str, Any]:
    """The mode's image arguments of a stage pipeline (for super-resolution the source is `original_image`)."""
    if mode == "text2img":
        return {}
    inputs = {"original_image" if original else "image": source, "strength": strength}
    if mode == "inpaint":
        inputs["mask_image"] = mask
    return inputs


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased (as PIL's resize, which the original uses), kept in `[-1, 1]`."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def stage_3_texts(has_stage_3: bool, prompt, stage_3_prompt, negative_prompt, batch_size: int,
                  num_images_per_prompt: int, steps: int, guidance_scale: float,
                  noise_level: int) -> tuple[list[str], list[str] | None] | None:  # fmt: skip
    """Stage III's arguments, checked before any model runs; returns its prompts and negative prompts, one per
    final image (`B * num_images_per_prompt`, in the order of the images)."""
    if not has_stage_3:
        if stage_3_prompt is not None:
            raise ValueError("stage_3_prompt was given, but this cascade has no stage III components")
        return None
    text = stage_3_prompt if stage_3_prompt is not None else prompt
    if text is None:
        raise ValueError(
            "stage III (the x4 upscaler) encodes text with its own CLIP encoder: with prompt_embeds, pass "
            "stage_3_prompt as text"
        )
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or len(texts) != batch_size:
        raise ValueError(f"stage_3_prompt={stage_3_prompt!r}: expected a str or {batch_size} str, one per prompt")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"stage_3_num_inference_steps={steps!r}: expected a positive int")
    check_guidance_scale("stage_3_guidance_scale", guidance_scale)
    if (
        isinstance(noise_level, bool)
        or not isinstance(noise_level, int)
        or not 0 <= noise_level <= STAGE_3_MAX_NOISE_LEVEL
    ):
        raise ValueError(f"stage_3_noise_level={noise_level!r}: expected an int in [0, {STAGE_3_MAX_NOISE_LEVEL}]")
    negatives = None
    if negative_prompt is not None:
        negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
    return [t for t in texts for _ in range(num_images_per_prompt)], negatives


def stage_sizes(stage_1_unet, stage_2_unet, has_stage_3: bool, source: torch.Tensor | None, height: int | None,
                width: int | None) -> list[tuple[int, int]]:  # fmt: skip
    """`(H, W)` of every stage: stage I from `height`/`width` (text-to-image) or the source image's aspect ratio with
    the short side at `sample_size` (the original's `_prepare_pil_image`), then x4 per stage."""
    multiple_1, multiple_2 = size_multiple(stage_1_unet), size_multiple(stage_2_unet)
    sample_size = stage_1_unet.config.sample_size
    if source is None:
        size = (sample_size if height is None else height, sample_size if width is None else width)
        check_size(*size, multiple_1)
    else:
        if height is not None or width is not None:
            raise ValueError(
                f"height={height!r}, width={width!r}: with image, stage I's size follows the image's aspect "
                "ratio; resize the image instead"
            )
        short, (h, w) = sample_size, source.shape[-2:]
        size = (short, round(short * w / h / multiple_1) * multiple_1) if w >= h else (
            round(short * h / w / multiple_1) * multiple_1, short)  # fmt: skip
        check_size(*size, multiple_1, "height/width", f" (stage I size for image of size {(h, w)})")
    sizes = [size, super_resolution_size(*size, multiple_2)]
    check_size(*sizes[1], multiple_2, "height/width", f" (stage II size, x4 of stage I's {size})")
    if has_stage_3:
        sizes.append((sizes[1][0] * 4, sizes[1][1] * 4))
    return sizes


def stage_images(source: torch.Tensor | None, mask_image, sizes: list[tuple[int, int]], batch_size: int,
                 num_images_per_prompt: int) -> tuple[list, list]:  # fmt: skip
    """img2img / inpainting: the source images `(B, 3, H, W)` and the mask resized to every stage's size, one row
    per generated image: lists of `(B * n, 3, H, W)` in `[-1, 1]` and `(B * n, 1, H, W)` of 0/1 (`None`s in
    text-to-image). The mask is binarised at 0.5 after an antialiased resize, as the original's `img_as_bool(resize)`."""
    nones = [None] * len(sizes)
    if source is None:
        return nones, nones
    sources = [resize(source, size).repeat_interleave(num_images_per_prompt, 0) for size in sizes]
    if mask_image is None:
        return sources, nones
    mask = to_mask_tensor(mask_image, "mask_image")
    check_batch("mask_image", mask.shape[0], batch_size, allow_one=True)
    if mask.shape[-2:] != source.shape[-2:]:
        raise ValueError(
            f"mask_image has size {tuple(mask.shape[-2:])}; expected the image's {tuple(source.shape[-2:])}"
        )
    mask = mask.expand(batch_size, -1, -1, -1).repeat_interleave(num_images_per_prompt, 0)
    return sources, [(F.interpolate(mask, size, mode="bilinear", antialias=True) >= 0.5).float() for size in sizes]
