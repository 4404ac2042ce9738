"""diffusers' own IF pipelines run our UNet classes with exactly the outputs of the stock class."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel

from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel

NO_TEXT_MODELS = {"tokenizer": None, "text_encoder": None, "safety_checker": None, "feature_extractor": None,
                      "watermarker": None, "requires_safety_checker": False}  # fmt: skip


def _run(pipeline_class, unet, folder, **call):
    components = dict(unet=unet, scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"), **NO_TEXT_MODELS)
    if pipeline_class is IFSuperResolutionPipeline:
        components["image_noising_scheduler"] = DDPMScheduler.from_pretrained(folder / "image_noising_scheduler")
    pipeline = pipeline_class(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="pt", **call).images


@pytest.mark.parametrize(
    "name, pipeline_class, ours_class",
    [
        ("base", IFPipeline, IFUNet2DConditionModel),
        ("super_res", IFSuperResolutionPipeline, IFSuperResUNet2DConditionModel),
    ],
)
def test_diffusers_pipeline_gives_identical_images(converted, name, pipeline_class, ours_class):
    _, folder = converted(name)
    generator = torch.Generator().manual_seed(3)
    call = {"prompt_embeds": torch.randn(2, 6, 24, generator=generator),
                "negative_prompt_embeds": torch.randn(2, 6, 24, generator=generator)}  # fmt: skip
    size = 16 if pipeline_class is IFPipeline else 32
    call.update(height=size, width=size)
    if pipeline_class is IFSuperResolutionPipeline:
        call.update(image=torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1, noise_level=100)
    ours = _run(pipeline_class, ours_class.from_pretrained(folder / "unet"), folder, **call)
    stock = _run(pipeline_class, UNet2DConditionModel.from_pretrained(folder / "unet"), folder, **call)
    assert ours.shape == (2, 3, size, size) and torch.isfinite(ours).all()
    assert torch.equal(ours, stock)
