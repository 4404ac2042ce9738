"""What the six pipelines accept and refuse.

Bad input raises `ValueError` naming the argument, the value and what is expected, before any model runs: the
`guarded` pipelines' UNet and text encoder raise `AssertionError` when called, so a check that comes too late fails
the test. Sizes: stage I takes any size the UNet takes, super-resolution infers x4 of its input. Input forms: every
form diffusers' IF pipelines accept gives diffusers' images; the extra forms we accept give the same images as their
canonical form.
"""

from __future__ import annotations

import io
import logging
import re

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ORIGINAL_BASE, STAGE_II_CONFIGS
from diffusers import DDIMScheduler

import if_diffusers
from if_diffusers.conversion.oracle import randomize_
from if_diffusers.image_processing import to_image_tensor
from if_diffusers.models.original_params import OriginalUNetParams
from if_diffusers.pipelines.base import IFPipelineBase

TOLERANCE = 1e-4  # max abs, float32
PROMPTS = ["a red circle", "a small green square", "a sign"]

# pipeline -> (stage, {image argument: side of the tiny components' valid input})
INPUTS = {
    "IFPipeline": ("I", {}),
    "IFImg2ImgPipeline": ("I", {"image": 16}),
    "IFInpaintingPipeline": ("I", {"image": 16, "mask_image": 16}),
    "IFSuperResolutionPipeline": ("II", {"image": 8}),
    "IFImg2ImgSuperResolutionPipeline": ("II", {"image": 8, "original_image": 32}),
    "IFInpaintingSuperResolutionPipeline": ("II", {"image": 8, "original_image": 32, "mask_image": 32}),
}
ALL = list(INPUTS)
IMAGE_ARGUMENTS = [(n, a) for n, (_, arguments) in INPUTS.items() for a in arguments if a != "mask_image"]
# the images denoising starts from: their size must suit the UNet (tiny stage I: multiples of 2, stage II: of 4)
START_IMAGES = [("IFImg2ImgPipeline", "image", 2), ("IFInpaintingPipeline", "image", 2),
                ("IFImg2ImgSuperResolutionPipeline", "original_image", 4),
                ("IFInpaintingSuperResolutionPipeline", "original_image", 4)]  # fmt: skip
WITH_MASK = [n for n in ALL if "mask_image" in INPUTS[n][1]]
WITH_STRENGTH = [n for n in ALL if "Img2Img" in n or "Inpainting" in n]
SUPER_RESOLUTION = [n for n in ALL if INPUTS[n][0] == "II"]


def _images(batch: int, height: int, width: int | None = None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width or height, generator=generator) * 2 - 1


def _mask(batch: int, height: int, width: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, height, width or height, generator=generator) > 0.5).float()


def _pil(height: int, width: int, seed: int = 2, mode: str = "RGB") -> PIL.Image.Image:
    generator = torch.Generator().manual_seed(seed)
    array = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return PIL.Image.fromarray(array).convert(mode)


def _call(name: str, batch: int = 1, **overrides) -> dict:
    """A valid call of `name` on the tiny components, with `overrides`."""
    call = {"prompt": PROMPTS[0] if batch == 1 else PROMPTS[:batch], "num_inference_steps": 2, "output_type": "pt"}
    for argument, side in INPUTS[name][1].items():
        call[argument] = _mask(batch, side) if argument == "mask_image" else _images(batch, side)
    return {**call, **overrides}


def _model_ran(module, args):
    raise AssertionError(f"{type(module).__name__} ran before the input check")


@pytest.fixture
def guarded(pipeline_components):
    """`guarded(name, **components)`: a pipeline whose UNet and text encoder raise `AssertionError` if called."""
    handles = []

    def build(name: str, **components):
        pipeline = getattr(if_diffusers, name)(**{**pipeline_components(INPUTS[name][0]), **components})
        handles.extend(
            module.register_forward_pre_hook(_model_ran) for module in (pipeline.unet, pipeline.text_encoder)
        )
        return pipeline

    yield build
    for handle in handles:
        handle.remove()


def _rejects(pipeline, message: str, **call) -> None:
    """`pipeline(**call)` raises ValueError whose message contains `message` (literal text)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        pipeline(**call)


def test_guard_catches_a_model_run(guarded):
    with pytest.raises(AssertionError, match="ran before the input check"):
        guarded("IFPipeline")(**_call("IFPipeline"))


# --- A. bad input: one test per category, across the pipelines that take the argument ------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("given", ["both", "neither"])
def test_exactly_one_of_prompt_and_prompt_embeds(guarded, name, given):
    call = _call(name)
    if given == "both":
        call["prompt_embeds"] = torch.zeros(1, 5, 24)
    else:
        call["prompt"] = None
    _rejects(guarded(name), f"pass exactly one of prompt and prompt_embeds; got {given}", **call)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "argument, embeds, message",
    [("prompt_embeds", torch.zeros(1, 5, 10), "prompt_embeds has shape (1, 5, 10); expected a tensor (batch, tokens, 24)"),
     ("prompt_embeds", torch.zeros(5, 24), "prompt_embeds has shape (5, 24); expected a tensor (batch, tokens, 24)"),
     ("prompt_embeds", np.zeros((1, 5, 24)), "prompt_embeds must be a tensor (batch, tokens, width); got ndarray"),
     ("negative_prompt_embeds", torch.zeros(1, 5, 32), "negative_prompt_embeds has shape (1, 5, 32); expected"),
     ("negative_prompt_embeds", torch.zeros(1, 7, 24), "negative_prompt_embeds has 7 tokens; expected 5 like prompt_embeds")],
)  # fmt: skip
def test_embeddings_of_the_wrong_shape(guarded, name, argument, embeds, message):
    call = _call(name, prompt=None, prompt_embeds=torch.zeros(1, 5, 24))
    _rejects(guarded(name), message, **{**call, argument: embeds})


def test_negative_prompt_embeds_token_count_follows_max_sequence_length(guarded):
    call = _call("IFPipeline", negative_prompt_embeds=torch.zeros(1, 5, 24))
    _rejects(
        guarded("IFPipeline"), "negative_prompt_embeds has 5 tokens; expected 77 like max_sequence_length", **call
    )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["negative_prompt", "negative_prompt_embeds", "generator"])
def test_batch_sizes_that_disagree_with_the_prompt(guarded, name, case):
    call = _call(name, batch=2)
    if case == "negative_prompt":
        call["negative_prompt"] = PROMPTS
        message = "negative_prompt has 3 prompt(s); expected 2, one per prompt"
    elif case == "negative_prompt_embeds":
        call.update(prompt=None, prompt_embeds=torch.zeros(2, 5, 24), negative_prompt_embeds=torch.zeros(1, 5, 24))
        message = "negative_prompt_embeds has batch 1; expected 2, the prompt batch size"
    else:
        call.update(num_images_per_prompt=2, generator=[torch.Generator() for _ in range(3)])
        message = "generator is a list of 3; expected one per image: 4 (batch 2 x num_images_per_prompt 2)"
    _rejects(guarded(name), message, **call)


@pytest.mark.parametrize("name, argument", IMAGE_ARGUMENTS)
def test_image_batch_disagrees_with_the_prompt(guarded, name, argument):
    call = _call(name, batch=2)
    call[argument] = _images(3, INPUTS[name][1][argument])
    _rejects(guarded(name), f"{argument} has batch size 3; expected 2, the prompt batch size", **call)


@pytest.mark.parametrize("name", WITH_MASK)
def test_mask_batch_disagrees_with_the_prompt(guarded, name):
    call = _call(name, batch=2)
    call["mask_image"] = _mask(3, INPUTS[name][1]["mask_image"])
    _rejects(guarded(name), "mask_image has batch size 3; expected 1 or 2, the prompt batch size", **call)


def _bad_images(side: int) -> list:
    """(bad value, expected message tail) pairs for an image argument whose valid side is `side`."""
    image = _images(1, side)
    nan, pixels = image.clone(), image * 127.5 + 127.5
    nan[0, 0, 0, 0] = float("nan")
    pixels[0, 0, 0, :2] = torch.tensor([0.0, 255.0])
    array = image.permute(0, 2, 3, 1).numpy()
    return [
        (None, " is required: expected a PIL image, a numpy array or a tensor in [-1, 1]"),
        ("image.png", " must be a PIL image, a numpy array or a tensor in [-1, 1], or a list of one kind of them; "
                      "got str"),
        ([image, array], " must be a PIL image, a numpy array or a tensor in [-1, 1], or a list of one kind of them; "
                         "got Tensor, ndarray"),
        ([], " must be a PIL image, a numpy array or a tensor in [-1, 1], or a list of one kind of them; got an empty "
             "list"),
        (torch.cat([image, image[:, :1]], 1), f" has shape (1, 4, {side}, {side}); expected RGB images (B, 3, H, W)"),
        (image[:, :1], f" has shape (1, 1, {side}, {side}); expected RGB images (B, 3, H, W) or (3, H, W)"),
        (np.concatenate([array, array[..., :1]], -1), f" has shape (1, {side}, {side}, 4); expected RGB images "
                                                        "(B, H, W, 3) or (H, W, 3) as arrays"),
        (image[0, 0], f" has shape ({side}, {side}); expected RGB images"),
        (((array + 1) * 127.5).astype(np.uint8), " has dtype uint8; expected floating point values in [-1, 1]"),
        ((image * 127.5 + 127.5).long(), " has dtype torch.int64; expected floating point values in [-1, 1]"),
        (pixels, " has values in [0, 255]; expected [-1, 1] (0-255 pixels: pass PIL images, or x / 127.5 - 1"),
        (nan, " has NaN or infinite values; expected values in [-1, 1]"),
        ([image, _images(1, side + 4)], f" mixes image sizes [({side}, {side}), ({side + 4}, {side + 4})]"),
    ]  # fmt: skip


@pytest.mark.parametrize("name, argument", IMAGE_ARGUMENTS)
def test_images_of_the_wrong_kind_shape_dtype_or_range(guarded, name, argument):
    pipeline = guarded(name)
    for value, message in _bad_images(INPUTS[name][1][argument]):
        _rejects(pipeline, argument + message, **_call(name, **{argument: value}))


@pytest.mark.parametrize("name, argument, multiple", START_IMAGES)
def test_start_image_of_a_size_the_unet_cannot_take(guarded, name, argument, multiple):
    side = INPUTS[name][1][argument]
    width = side - multiple // 2
    call = _call(name, **{argument: _images(1, side, width)})
    if "mask_image" in call:
        call["mask_image"] = _mask(1, side, width)
    message = (f"{argument} width={width}: the UNet takes positive multiples of {multiple} (one halving per "
               f"downsampling level); nearest sizes that work: {side - multiple} or {side}")  # fmt: skip
    _rejects(guarded(name), message, **call)


def test_pil_start_image_resized_to_a_size_the_unet_cannot_take_says_so(guarded, pipeline_components):
    """A PIL image is resized as diffusers does (short side to `sample_size`, long side to a multiple of 8): a UNet
    taking multiples of 16 cannot take 32x40, and the message says where 40 came from."""
    unet = _super_resolution_unet(multiple=16)
    pipeline = guarded("IFImg2ImgSuperResolutionPipeline", unet=unet)
    message = ("original_image width=40: the UNet takes positive multiples of 16 (one halving per downsampling level); "
               "nearest sizes that work: 32 or 48 (original_image is PIL, resized to (32, 40) with its short side at "
               "32 as diffusers does")  # fmt: skip
    _rejects(pipeline, message, **_call("IFImg2ImgSuperResolutionPipeline", original_image=_pil(64, 80)))


def _bad_masks(side: int) -> list:
    mask = _mask(1, side)
    nan = mask.clone()
    nan[0, 0, 0, 0] = float("nan")
    return [
        (None, "mask_image is required: expected a PIL image, a numpy array or a tensor in [0, 1]"),
        (3, "mask_image must be a PIL image, a numpy array or a tensor in [0, 1], or a list of one kind of them; got int"),
        (_mask(1, side // 2), f"mask_image has size ({side // 2}, {side // 2}); expected the image's ({side}, {side})"),
        (_pil(side, side + 8, mode="L"), f"mask_image has size ({side}, {side + 8}); expected the image's ({side}, "),
        (mask.repeat(1, 2, 1, 1), f"mask_image has shape (1, 2, {side}, {side}); expected one channel, 1 where to "
                                  "repaint: (H, W) for one mask, (B, H, W) or (B, 1, H, W) for a batch"),
        (mask[None], f"mask_image has shape (1, 1, 1, {side}, {side}); expected one channel"),
        ((mask[0, 0] * 255).to(torch.uint8).numpy(), "mask_image has values in [0, 255]; expected [0, 1] (0-255 "
                                                     "masks: pass PIL images, or divide by 255)"),
        (mask * 2 - 1, "mask_image has values in [-1, 1]; expected [0, 1]"),
        (nan, "mask_image has NaN or infinite values; expected values in [0, 1]"),
    ]  # fmt: skip


@pytest.mark.parametrize("name", WITH_MASK)
def test_masks_of_the_wrong_kind_shape_range_or_size(guarded, name):
    pipeline = guarded(name)
    for value, message in _bad_masks(INPUTS[name][1]["mask_image"]):
        _rejects(pipeline, message, **_call(name, mask_image=value))


@pytest.mark.parametrize("name", WITH_STRENGTH)
@pytest.mark.parametrize("strength", [0, -0.1, 1.5, None, "0.5", True, float("nan")])
def test_strength_outside_zero_one(guarded, name, strength):
    _rejects(guarded(name), f"strength={strength!r}: expected a number in (0, 1]", **_call(name, strength=strength))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("guidance_scale", [float("nan"), float("inf"), -float("inf"), "7", True, None])
def test_guidance_scale_that_is_not_a_finite_number(guarded, name, guidance_scale):
    message = f"guidance_scale={guidance_scale!r}: expected a finite number (> 1 enables guidance)"
    _rejects(guarded(name), message, **_call(name, guidance_scale=guidance_scale))


@pytest.mark.parametrize("name", WITH_STRENGTH)
def test_strength_that_keeps_no_step(guarded, name):
    message = "strength=0.2 keeps int(4 * 0.2) = 0 of 4 steps; expected strength >= 1/4, or more steps"
    _rejects(guarded(name), message, **_call(name, strength=0.2, num_inference_steps=4))


@pytest.mark.parametrize("name", SUPER_RESOLUTION)
@pytest.mark.parametrize("noise_level", [-1, 1000, 250.5, None, True])
def test_noise_level_outside_the_noising_schedule(guarded, name, noise_level):
    message = f"noise_level={noise_level!r}: expected an int in [0, 1000) (image_noising_scheduler)"
    _rejects(guarded(name), message, **_call(name, noise_level=noise_level))


@pytest.mark.parametrize("name", SUPER_RESOLUTION)
@pytest.mark.parametrize("factor", [1, 3, 64, 2.0, True, "4"])
def test_low_res_consistency_factor_must_divide_the_output(guarded, name, factor):
    message = (f"low_res_consistency_factor={factor!r}: expected None or an int >= 2 dividing the output size "
               "(32, 32)")  # fmt: skip
    _rejects(guarded(name), message, **_call(name, low_res_consistency_factor=factor))


@pytest.mark.parametrize("name", SUPER_RESOLUTION)
@pytest.mark.parametrize(
    "late, message",
    [
        (dict(low_res_consistency_late_factor=3, low_res_consistency_late_timestep=300),
         "low_res_consistency_late_factor=3: expected None or an int >= 2 dividing the output size (32, 32)"),
        (dict(low_res_consistency_late_factor=2, low_res_consistency_late_timestep=300,
              low_res_consistency_factor=None),
         "low_res_consistency_late_factor=2 was given with low_res_consistency_factor=None; expected a "
         "low_res_consistency_factor for the steps before low_res_consistency_late_timestep"),
        (dict(low_res_consistency_late_factor=2),
         "low_res_consistency_late_timestep=None and low_res_consistency_late_factor=2: expected both"),
        (dict(low_res_consistency_late_timestep=300),
         "low_res_consistency_late_timestep=300 and low_res_consistency_late_factor=None: expected both"),
        *[(dict(low_res_consistency_late_factor=2, low_res_consistency_late_timestep=timestep),
           f"low_res_consistency_late_timestep={timestep!r}: expected an int in [1, 1000) (the scheduler's "
           "num_train_timesteps)") for timestep in (0, 1000, 300.5, True, "300")],
    ],
)  # fmt: skip
def test_low_res_consistency_late_factor_and_timestep(guarded, name, late, message):
    _rejects(guarded(name), message, **_call(name, **{"low_res_consistency_factor": 4, **late}))


@pytest.mark.parametrize(
    "size, message",
    [((0, 16), "height=0: the UNet takes positive multiples of 2 (one halving per downsampling level); nearest sizes "
               "that work: 2"),
     ((-16, 16), "height=-16: the UNet takes positive multiples of 2"),
     ((16, 15), "width=15: the UNet takes positive multiples of 2 (one halving per downsampling level); nearest sizes "
                "that work: 14 or 16"),
     ((16.0, 16), "height=16.0: expected an int, a positive multiple of 2 for this UNet"),
     ((16, "16"), "width='16': expected an int, a positive multiple of 2 for this UNet")],
)  # fmt: skip
def test_stage_one_size_the_unet_cannot_take(guarded, size, message):
    _rejects(guarded("IFPipeline"), message, **_call("IFPipeline", height=size[0], width=size[1]))


@pytest.mark.parametrize(
    "size, message",
    [((30, None), "height=30: the UNet takes positive multiples of 4 (one halving per downsampling level); nearest "
                  "sizes that work: 28 or 32"),
     ((None, 0), "width=0: the UNet takes positive multiples of 4 (one halving per downsampling level); nearest sizes "
                 "that work: 4"),
     ((32, 50.0), "width=50.0: expected an int, a positive multiple of 4 for this UNet")],
)  # fmt: skip
def test_super_resolution_size_the_unet_cannot_take(guarded, size, message):
    call = _call("IFSuperResolutionPipeline", height=size[0], width=size[1])
    _rejects(guarded("IFSuperResolutionPipeline"), message, **call)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "steps, message",
    [({"timesteps": "smart28"}, "timesteps='smart28' is not a preset: expected one of ['fast27', 'smart100'"),
     ({"timesteps": [10, 500]}, "timesteps=[10, 500]: expected distinct integers in [0, 1000) in descending order"),
     ({"num_inference_steps": 0}, "num_inference_steps=0: expected a positive int")],
)  # fmt: skip
def test_timesteps_that_do_not_resolve(guarded, name, steps, message):
    _rejects(guarded(name), message, **_call(name, **steps))


def test_custom_timesteps_on_a_scheduler_that_cannot_take_them(guarded, pipeline_components):
    scheduler = DDIMScheduler.from_config(pipeline_components("I")["scheduler"].config)
    message = "timesteps='smart27': DDIMScheduler cannot take custom timesteps; use num_inference_steps"
    _rejects(guarded("IFPipeline", scheduler=scheduler), message, **_call("IFPipeline", timesteps="smart27"))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "names, message",
    [(["latents"], "callback_on_step_end_tensor_inputs names ['latents']; this pipeline exposes "
                   "['intermediate_images', 'prompt_embeds']"),
     ("intermediate_images", "callback_on_step_end_tensor_inputs='intermediate_images': expected a list of names")],
)  # fmt: skip
def test_callback_tensor_names_the_pipeline_does_not_expose(guarded, name, names, message):
    call = _call(name, callback_on_step_end=lambda *args: {}, callback_on_step_end_tensor_inputs=names)
    _rejects(guarded(name), message, **call)


# --- B. sizes: any aspect ratio the UNet takes; super-resolution infers x4 of its input -----------------------------


def _unet(cls, params: dict, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(cls.from_config(OriginalUNetParams.parse(params).to_unet_config()), seed)


def _super_resolution_unet(multiple: int):
    """A super-resolution UNet with one more level than the tiny one (multiples of 8) or two (16)."""
    levels = {8: "1,1,2,2", 16: "1,1,1,2,2"}[multiple]
    return _unet(if_diffusers.IFSuperResUNet2DConditionModel,
                 {**STAGE_II_CONFIGS["super_res"], "channel_mult": levels, "num_res_blocks": 1})  # fmt: skip


@pytest.fixture(scope="module")
def eight_multiple_stage_one():
    """A stage-I UNet with four levels: it takes multiples of 8 only."""
    return _unet(if_diffusers.IFUNet2DConditionModel, {**ORIGINAL_BASE, "image_size": 32, "channel_mult": "1,1,1,1"})


def _pair(name: str, components: dict):
    ours, theirs = getattr(if_diffusers, name)(**components), getattr(diffusers, name)(**components)
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    return ours, theirs


def _run(pipeline, seed: int = 0, **call) -> torch.Tensor:
    if isinstance(pipeline, IFPipelineBase):  # diffusers' float32 DDPM schedule, for parity with diffusers
        call.setdefault("float64_schedule", False)
    return pipeline(**call, generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("height, width", [(16, 32), (32, 16)])
def test_stage_one_any_aspect_ratio_the_unet_takes(pipeline_components, eight_multiple_stage_one, height, width):
    ours, theirs = _pair("IFPipeline", {**pipeline_components("I"), "unet": eight_multiple_stage_one})
    call = _call("IFPipeline", height=height, width=width)
    images = _run(ours, **call)
    assert images.shape == (1, 3, height, width)
    assert (images - _run(theirs, **call)).abs().max() < TOLERANCE


def test_stage_one_rejects_a_size_with_the_nearest_that_work(guarded, eight_multiple_stage_one):
    pipeline = guarded("IFPipeline", unet=eight_multiple_stage_one)
    message = ("width=20: the UNet takes positive multiples of 8 (one halving per downsampling level); nearest sizes "
               "that work: 16 or 24")  # fmt: skip
    _rejects(pipeline, message, **_call("IFPipeline", height=16, width=20))
    _rejects(pipeline, "height=4: the UNet takes positive multiples of 8", **_call("IFPipeline", height=4, width=16))


@pytest.mark.parametrize("low_res", [(8, 12), (12, 8)])
def test_super_resolution_output_is_four_times_its_input(pipeline_components, low_res):
    """diffusers squashes every input to `sample_size` (32) unless told the size; we infer x4 and give what
    diffusers gives when told that size."""
    ours, theirs = _pair("IFSuperResolutionPipeline", pipeline_components("II"))
    call = _call("IFSuperResolutionPipeline", image=_images(1, *low_res))
    images = _run(ours, **call)
    assert images.shape == (1, 3, low_res[0] * 4, low_res[1] * 4)
    told = _run(theirs, **call, height=low_res[0] * 4, width=low_res[1] * 4)
    assert (images - told).abs().max() < TOLERANCE


def test_super_resolution_floors_x4_to_a_size_the_unet_takes(pipeline_components, caplog):
    """The original's rule: x4 floored to a size the UNet takes (here multiples of 8: 9x10 -> 36x40 -> 32x40), with
    a warning; too small an input for any size is rejected."""
    pipeline = if_diffusers.IFSuperResolutionPipeline(**{**pipeline_components("II"),
                                                         "unet": _super_resolution_unet(multiple=8)})  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="if_diffusers"):
        images = _run(pipeline, **_call("IFSuperResolutionPipeline", image=_images(1, 9, 10)))
    assert images.shape == (1, 3, 32, 40)
    assert "x4 (36, 40) is not a size the UNet takes (multiples of 8); the output is (32, 40)" in caplog.text
    message = "image has size (1, 2): x4 is (4, 8), smaller than the UNet's smallest size 8; pass height and width"
    _rejects(pipeline, message, **_call("IFSuperResolutionPipeline", image=_images(1, 1, 2)))


@pytest.mark.parametrize("name", ["IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline"])
def test_super_resolution_from_a_non_square_original_image(pipeline_components, name):
    """The output takes `original_image`'s size (here 32x48 from an 8x12 input), as diffusers does; a PIL
    `original_image` of 48x72 is resized keeping its aspect ratio to the same size."""
    ours, theirs = _pair(name, pipeline_components("II"))
    call = _call(name, image=_images(1, 8, 12), original_image=_images(1, 32, 48, seed=3), strength=0.5)
    if "mask_image" in call:
        call["mask_image"] = _mask(1, 32, 48)
    images = _run(ours, **call)
    assert images.shape == (1, 3, 32, 48)
    assert (images - _run(theirs, **call)).abs().max() < TOLERANCE
    call["original_image"] = _pil(48, 72)
    assert _run(ours, **call).shape == (1, 3, 32, 48)


# --- C. input forms: diffusers' forms give diffusers' images, ours give their canonical form's ----------------------


def _array(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def _to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(a) for a in ((_array(images) + 1) * 127.5).round().astype(np.uint8)]


FORMS_DIFFUSERS_TAKES = [
    ("IFImg2ImgPipeline", dict(prompt=PROMPTS[:2], image=_to_pil(_images(2, 16)))),
    ("IFImg2ImgPipeline", dict(image=_pil(16, 24))),  # non-square PIL: resized keeping aspect to 16x24
    ("IFImg2ImgPipeline", dict(prompt=PROMPTS[:2], image=_array(_images(2, 16)))),
    ("IFImg2ImgPipeline", dict(image=[_images(1, 16)[0]])),  # a list of (3, H, W)
    ("IFInpaintingPipeline", dict(image=_pil(16, 16), mask_image=_pil(16, 16, seed=5, mode="L"))),
    ("IFInpaintingPipeline", dict(mask_image=_pil(16, 16, seed=5))),  # an RGB mask, read as "L"
    ("IFInpaintingPipeline", dict(mask_image=[_mask(1, 16)[0, 0].numpy()])),  # diffusers' array form: [(H, W)]
    ("IFInpaintingPipeline", dict(prompt=PROMPTS[:2], image=_images(2, 16),
                                  mask_image=[m[0].numpy() for m in _mask(2, 16)])),
    ("IFInpaintingPipeline", dict(mask_image=_mask(1, 16)[0])),  # (1, H, W)
    ("IFInpaintingPipeline", dict(prompt=PROMPTS[:2], image=_images(2, 16), mask_image=[m[0] for m in _mask(2, 16)])),
    ("IFSuperResolutionPipeline", dict(image=_pil(8, 8))),
    ("IFSuperResolutionPipeline", dict(prompt=PROMPTS[:2], image=_to_pil(_images(2, 8)))),
    ("IFSuperResolutionPipeline", dict(prompt=PROMPTS[:2], image=_array(_images(2, 8)))),
    ("IFSuperResolutionPipeline", dict(prompt=PROMPTS[:2], image=list(_images(2, 8)))),
    ("IFImg2ImgSuperResolutionPipeline", dict(original_image=_array(_images(1, 32, seed=4)))),
    ("IFInpaintingSuperResolutionPipeline", dict(image=_pil(8, 8), original_image=_pil(32, 32),
                                                 mask_image=[_mask(1, 32)[0, 0].numpy()])),
]  # fmt: skip


@pytest.mark.parametrize("name, inputs", FORMS_DIFFUSERS_TAKES, ids=[f"{n}-{i}" for i, (n, _) in
                                                                     enumerate(FORMS_DIFFUSERS_TAKES)])  # fmt: skip
def test_input_forms_diffusers_takes_give_diffusers_images(pipeline_components, name, inputs):
    ours, theirs = _pair(name, pipeline_components(INPUTS[name][0]))
    batch = len(inputs["prompt"]) if "prompt" in inputs else 1
    call = _call(name, batch=batch, guidance_scale=1.0, **inputs)  # one UNet batch: the forms are what is tested
    images = _run(ours, **call)
    assert (images - _run(theirs, **call)).abs().max() < TOLERANCE


# (pipeline, argument, our extra form, its canonical form); diffusers cannot take these (its batch checks read
# shape[0] of one array as the batch size, and it stacks one (B, H, W) mask tensor into B channels)
FORMS_WE_ADD = [
    ("IFImg2ImgPipeline", "image", _array(_images(1, 16))[0], _images(1, 16)),  # (H, W, 3)
    ("IFSuperResolutionPipeline", "image", _images(1, 8)[0], _images(1, 8)),  # (3, H, W)
    ("IFInpaintingPipeline", "mask_image", _mask(1, 16)[0, 0], _mask(1, 16)),  # (H, W) tensor
    ("IFInpaintingPipeline", "mask_image", _mask(1, 16)[0, 0].numpy(), _mask(1, 16)),  # (H, W) array
    ("IFInpaintingPipeline", "mask_image", _mask(1, 16)[0, 0].bool(), _mask(1, 16)),  # bool
    ("IFInpaintingSuperResolutionPipeline", "mask_image", _mask(2, 32)[:, 0], _mask(2, 32)),  # (B, H, W) tensor
]  # fmt: skip


@pytest.mark.parametrize("name, argument, form, canonical", FORMS_WE_ADD,
                         ids=[f"{n}-{i}" for i, (n, *_) in enumerate(FORMS_WE_ADD)])  # fmt: skip
def test_input_forms_we_add_give_their_canonical_forms_images(pipeline_components, name, argument, form, canonical):
    pipeline = getattr(if_diffusers, name)(**pipeline_components(INPUTS[name][0]))
    pipeline.set_progress_bar_config(disable=True)
    batch = canonical.shape[0]
    images = _run(pipeline, **_call(name, batch=batch, guidance_scale=1.0, **{argument: form}))
    assert torch.equal(images, _run(pipeline, **_call(name, batch=batch, guidance_scale=1.0, **{argument: canonical})))


def test_a_list_of_pil_images_from_different_file_formats_is_one_kind():
    """Opened files are subclasses of `PIL.Image.Image` (PngImageFile, BmpImageFile, ...): still one kind of input."""
    files = []
    for image, kind in zip(_to_pil(_images(2, 16)), ("PNG", "BMP")):
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
        files.append(PIL.Image.open(buffer))
    assert type(files[0]) is not type(files[1])
    expected = to_image_tensor(_to_pil(_images(2, 16)), "image")
    assert torch.equal(to_image_tensor(files, "image"), expected)


def test_inputs_are_not_modified(pipeline_components):
    """Masks are binarised and images converted on copies: the caller's tensors stay as they were."""
    pipeline = if_diffusers.IFInpaintingPipeline(**pipeline_components("I"))
    pipeline.set_progress_bar_config(disable=True)
    image, mask = _images(1, 16), torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    before = (image.clone(), mask.clone())
    _run(pipeline, **_call("IFInpaintingPipeline", image=image, mask_image=mask, num_inference_steps=1))
    assert torch.equal(image, before[0]) and torch.equal(mask, before[1])
