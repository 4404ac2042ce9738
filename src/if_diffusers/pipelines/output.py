"""What the IF pipelines return, and the last step before it: IF's safety checker on every output type (diffusers'
IF pipelines check PIL output only), flagged images blacked out, and the watermark on PIL images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.deepfloyd_if import IFPipelineOutput
from diffusers.utils import BaseOutput, logging

from ..image_processing import postprocess

__all__ = [
    "IFCascadePipelineOutput",
    "IFPipelineOutput",
    "black_out",
    "check_safety",
    "register_with_safety_components",
    "to_output_images",
]

logger = logging.get_logger(__name__)


@dataclass
class IFCascadePipelineOutput(BaseOutput):
    """`IFPipelineOutput` plus, with `return_intermediates`, the images of the stages before the last one (in the
    same `output_type`, checked and watermarked like the final images).

    Args:
        images: the final images (stage III's, or stage II's when the cascade has no stage III).
        nsfw_detected, watermark_detected: per image, from the safety checker (`None` without one).
        stage_1_images, stage_2_images: the intermediate stages' images, or `None`.
    """

    images: Any
    nsfw_detected: list[bool] | None
    watermark_detected: list[bool] | None
    stage_1_images: Any = None
    stage_2_images: Any = None


def register_with_safety_components(pipeline, requires_safety_checker: bool, **components: Any) -> None:
    """`pipeline.register_modules(**components)` and its `requires_safety_checker` config, as diffusers' IF pipelines
    do: a warning when the checker is off but required, an error for a checker without its image processor."""
    if components["safety_checker"] is None and requires_safety_checker:
        logger.warning(
            f"You have disabled the safety checker for {type(pipeline).__name__} by passing `safety_checker=None`."
            " Ensure that you abide by the conditions of the IF license and do not expose unfiltered results in"
            " services or applications open to the public."
        )
    if components["safety_checker"] is not None and components["feature_extractor"] is None:
        raise ValueError(
            "safety_checker was given without feature_extractor: the checker needs its CLIP image processor; "
            "pass feature_extractor, or safety_checker=None"
        )
    pipeline.register_modules(**components)
    pipeline.register_to_config(requires_safety_checker=requires_safety_checker)


def check_safety(pipeline, images: torch.Tensor, dtype: torch.dtype) -> tuple[list[bool] | None, list[bool] | None]:
    """IF's safety checker on `(B, 3, H, W)` images in `[-1, 1]`: `(nsfw_detected, watermark_detected)` per image,
    or `(None, None)` when `pipeline.safety_checker` is `None`. Runs whatever the output type."""
    if pipeline.safety_checker is None:
        return None, None
    checked = postprocess(images, "np")
    inputs = pipeline.feature_extractor(pipeline.numpy_to_pil(checked), return_tensors="pt")
    _, nsfw_detected, watermark_detected = pipeline.safety_checker(
        images=checked, clip_input=inputs.to(pipeline._execution_device).pixel_values.to(dtype=dtype)
    )
    return list(nsfw_detected), list(watermark_detected)


def black_out(images: torch.Tensor, nsfw_detected: list[bool] | None, watermark_detected: list[bool] | None):
    """`images` `(B, 3, H, W)` with the flagged ones set to black (-1), as the checker blacks out its own copy."""
    if nsfw_detected is None:
        return images
    flagged = torch.tensor([n or w for n, w in zip(nsfw_detected, watermark_detected)], device=images.device)
    images = images.clone()
    images[flagged] = -1.0
    return images


def to_output_images(pipeline, images: torch.Tensor, output_type: str, watermark_size: int | None) -> Any:
    """`(B, 3, H, W)` in `[-1, 1]` to `output_type`, with IF's watermark on PIL images when the pipeline has a
    watermarker (`watermark_size`: the size the watermark is scaled for, as diffusers passes the UNet's)."""
    result = postprocess(images, output_type)
    if output_type == "pil" and pipeline.watermarker is not None:
        result = pipeline.watermarker.apply_watermark(result, watermark_size)
    return result
