"""Each pipeline and its diffusers twin, given the same components, seed and arguments, give the same images."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import if_diffusers

TOLERANCE = 1e-4  # max abs, float32


def _images(seed, batch, size, low=-1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * (1 - low) + low


def _mask(seed, batch, size):
    return (torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def _pil(seed, size):
    array = (torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()
    return PIL.Image.fromarray(array)


# (pipeline name, stage, call arguments) - each case varies a different argument
CASES = [
    ("IFPipeline", "I", dict(prompt="a red circle on a blue background")),
    ("IFPipeline", "I", dict(prompt=["a red circle", "a small green square"], negative_prompt=["blue", "the top"],
                             num_images_per_prompt=2)),
    ("IFPipeline", "I", dict(prompt="a green square", height=16, width=32, guidance_scale=3.0)),
    ("IFPipeline", "I", dict(prompt="a green square", guidance_scale=1.0)),
    ("IFImg2ImgPipeline", "I", dict(prompt=["a red circle", "a sign"], image=_images(1, 2, 16), strength=0.5)),
    ("IFImg2ImgPipeline", "I", dict(prompt="a red circle", image=_pil(2, 16), num_images_per_prompt=2)),
    ("IFInpaintingPipeline", "I", dict(prompt="a red circle", image=_images(3, 1, 16), mask_image=_mask(4, 1, 16))),
    ("IFInpaintingPipeline", "I", dict(prompt=["a", "b"], image=_images(3, 2, 16), mask_image=_mask(4, 1, 16),
                                       strength=0.6, negative_prompt=["c", "d"])),
    ("IFSuperResolutionPipeline", "II", dict(prompt="a red circle", image=_images(5, 1, 8))),
    ("IFSuperResolutionPipeline", "II", dict(prompt=["a red circle", "b"], image=_images(5, 2, 8), noise_level=0,
                                             num_images_per_prompt=2)),
    ("IFSuperResolutionPipeline", "II", dict(prompt="a red circle", image=_images(5, 1, 8), noise_level=999,
                                             height=32, width=32)),
    ("IFImg2ImgSuperResolutionPipeline", "II", dict(prompt="a red circle", image=_images(6, 1, 8),
                                                    original_image=_images(7, 1, 32), strength=0.7)),
    ("IFImg2ImgSuperResolutionPipeline", "II", dict(prompt="a red circle", image=_images(6, 1, 8),
                                                    original_image=_pil(8, 32), noise_level=100)),
    ("IFInpaintingSuperResolutionPipeline", "II", dict(prompt="a red circle", image=_images(6, 1, 8),
                                                       original_image=_images(7, 1, 32),
                                                       mask_image=_mask(9, 1, 32))),
    ("IFInpaintingSuperResolutionPipeline", "II", dict(prompt=["x", "y"], image=_images(6, 2, 8),
                                                       original_image=_images(7, 2, 32),
                                                       mask_image=_pil(9, 32).convert("L"), noise_level=50)),
]  # fmt: skip


def _pair(name, stage, pipeline_components):
    ours = getattr(if_diffusers, name)(**pipeline_components(stage))
    theirs = getattr(diffusers, name)(**pipeline_components(stage))
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    return ours, theirs


def _as_array(images):
    if isinstance(images, list):
        return np.stack([np.asarray(i, dtype=np.float64) for i in images])
    return np.asarray(images, dtype=np.float64)


@pytest.mark.parametrize("name, stage, call", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_same_images_as_diffusers(pipeline_components, name, stage, call, output_type):
    ours, theirs = _pair(name, stage, pipeline_components)
    run = dict(call, num_inference_steps=4, output_type=output_type)
    # float64_schedule=False: diffusers' float32 DDPM schedule (ours defaults to the original's float64)
    a = ours(**run, float64_schedule=False, generator=torch.Generator().manual_seed(0)).images
    b = theirs(**run, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(_as_array(a) - _as_array(b)).max() < (TOLERANCE if output_type != "pil" else 1.0)
    assert len(a) == len(b)


@pytest.mark.parametrize("name, stage, extra", [("IFPipeline", "I", {}),
                                                ("IFSuperResolutionPipeline", "II", {"image": _images(5, 2, 8)})])  # fmt: skip
def test_prompt_embeds_reuse_matches_diffusers(pipeline_components, name, stage, extra):
    ours, theirs = _pair(name, stage, pipeline_components)
    prompt_embeds, negative_embeds = theirs.encode_prompt(["a red circle", "a sign"], clean_caption=True)
    ours_embeds = ours.encode_prompt(["a red circle", "a sign"])
    assert torch.equal(ours_embeds[0], prompt_embeds) and torch.equal(ours_embeds[1], negative_embeds)
    run = dict(extra, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=3,
               output_type="pt")  # fmt: skip
    a = ours(**run, float64_schedule=False, generator=torch.Generator().manual_seed(1)).images
    b = theirs(**run, generator=torch.Generator().manual_seed(1)).images
    assert (a - b).abs().max() < TOLERANCE


@pytest.mark.parametrize("name", sorted({case[0] for case in CASES}))
def test_call_signature_extends_diffusers(name):
    """Drop-in: diffusers' `__call__` arguments come first, in its order, with its defaults and kinds; ours only add
    keyword-only arguments after them, and the components are the same."""
    import inspect

    theirs = list(inspect.signature(getattr(diffusers, name).__call__).parameters.values())
    ours = list(inspect.signature(getattr(if_diffusers, name).__call__).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[: len(theirs)]] == [(p.name, p.default, p.kind) for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])
    components = list(inspect.signature(getattr(diffusers, name).__init__).parameters)
    assert list(inspect.signature(getattr(if_diffusers, name).__init__).parameters) == components
