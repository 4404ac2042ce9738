"""One generator per image, diffusers' convention for reproducible batches: image k of a batch made with
`generator=[g_0, ..., g_n]` equals image k made alone with `g_k` (and with `[g_k]`), for every stage pipeline in every
mode (augmentation noise redrawn per step and low-res consistency included) and for the cascade with stage III. Only
batched arithmetic may differ (float32, well under 1e-4)."""

from __future__ import annotations

import pytest
import torch
from test_cascade import _mask, _source, cascade  # noqa: F401  (the cascade fixture)
from test_pipeline_features import CASES, _pipeline

PROMPTS = ["a red circle", "a green square"]
SEEDS = (10, 11)
BATCHED_ARITHMETIC = 1e-4  # float32 sums over another batch size; any drawing difference moves pixels by ~0.1-1
IMAGE_ARGUMENTS = ("image", "original_image")


def _per_prompt(arguments: dict) -> dict:
    """The case's image arguments with one image per prompt (the second flipped), the mask shared."""
    return {k: torch.cat([v, v.flip(-1)]) if k in IMAGE_ARGUMENTS else v for k, v in arguments.items()}


def _row(arguments: dict, k: int) -> dict:
    return {key: v[k : k + 1] if key in IMAGE_ARGUMENTS else v for key, v in arguments.items()}


def _generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


SUPER_RESOLUTION_VARIANTS = {
    "augmented_once": {},
    "redrawn_augmentation": dict(redraw_augmentation_noise=True),
    "redrawn_with_consistency": dict(redraw_augmentation_noise=True, low_res_consistency_factor=4),
}
PIPELINE_CASES = [(name, "default", {}) for name, (stage, _, _) in CASES.items() if stage == "I"] + [
    (name, variant, extra)
    for name, (stage, _, _) in CASES.items()
    if stage == "II"
    for variant, extra in SUPER_RESOLUTION_VARIANTS.items()
]


@pytest.mark.parametrize("name, variant, extra", PIPELINE_CASES, ids=[f"{n}-{v}" for n, v, _ in PIPELINE_CASES])
def test_stage_pipeline_image_k_equals_image_k_made_alone(pipeline_components, name, variant, extra):
    stage, arguments, _ = CASES[name]
    pipeline = _pipeline(name, pipeline_components(stage))
    arguments = _per_prompt(arguments)
    common = dict(num_inference_steps=3, output_type="pt", **extra)
    batch = pipeline(prompt=PROMPTS, generator=_generators(SEEDS), **arguments, **common).images
    for k, seed in enumerate(SEEDS):
        for generator in (torch.Generator().manual_seed(seed), _generators([seed])):
            alone = pipeline(prompt=PROMPTS[k], generator=generator, **_row(arguments, k), **common).images
            torch.testing.assert_close(batch[k : k + 1], alone, rtol=0, atol=BATCHED_ARITHMETIC)
    assert (batch[0] - batch[1]).abs().max() > 0.05  # the two images differ: the test can tell them apart


def test_stage_ii_with_images_per_prompt_and_a_positive_prompt(pipeline_components):
    """Three guidance copies (uncond, cond, positive) and two images per prompt: four generators, four images."""
    name = "IFSuperResolutionPipeline"
    pipeline = _pipeline(name, pipeline_components("II"))
    arguments = _per_prompt(CASES[name][1])
    common = dict(num_inference_steps=2, output_type="pt", redraw_augmentation_noise=True,
                  positive_prompt="a large yellow triangle")  # fmt: skip
    seeds = (20, 21, 22, 23)
    batch = pipeline(prompt=PROMPTS, num_images_per_prompt=2, generator=_generators(seeds), **arguments,
                     **{**common, "positive_prompt": [common["positive_prompt"]] * 2}).images  # fmt: skip
    for k, seed in enumerate(seeds):
        alone = pipeline(prompt=PROMPTS[k // 2], generator=torch.Generator().manual_seed(seed),
                         **_row(arguments, k // 2), **common).images  # fmt: skip
        torch.testing.assert_close(batch[k : k + 1], alone, rtol=0, atol=BATCHED_ARITHMETIC)


@pytest.mark.parametrize("mode", ["text2img", "img2img", "inpaint"])
def test_cascade_image_k_equals_image_k_made_alone_at_every_stage(cascade, mode):  # noqa: F811
    pipeline = cascade(True)
    source = _source() if mode != "text2img" else None
    images = {} if source is None else dict(image=source, mask_image=_mask() if mode == "inpaint" else None)
    common = dict(output_type="pt", return_intermediates=True, stage_1_num_inference_steps=2,
                  stage_2_num_inference_steps=2, stage_3_num_inference_steps=1,
                  **({"height": 8, "width": 8} if source is None else {}))  # fmt: skip
    batch = pipeline(PROMPTS, generator=_generators(SEEDS), **images, **common)
    for k, seed in enumerate(SEEDS):
        alone_images = {} if source is None else dict(images, image=source[k : k + 1])
        alone = pipeline(PROMPTS[k], generator=torch.Generator().manual_seed(seed), **alone_images, **common)
        for field in ("stage_1_images", "stage_2_images", "images"):
            torch.testing.assert_close(getattr(batch, field)[k : k + 1], getattr(alone, field), rtol=0,
                                       atol=BATCHED_ARITHMETIC, msg=lambda m, f=field: f"{f}: {m}")  # fmt: skip
