"""Converted UNets compute what the original `deepfloyd_if` UNets compute, and what diffusers' stock class
computes with the same folder."""

from __future__ import annotations

import pytest
import torch
from conftest import STAGE_I_CONFIGS, STAGE_II_CONFIGS
from diffusers import UNet2DConditionModel

from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.conversion.oracle import relative_error

TOLERANCE = 1e-5  # float32, max-abs-relative


def _text(params, batch=2, length=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, params["encoder_dim"], generator=generator)


def _sample(params, channels=3, batch=2, seed=2):
    generator = torch.Generator().manual_seed(seed)
    size = params["image_size"]
    return torch.randn(batch, channels, size, size, generator=generator)


@pytest.mark.parametrize("name", sorted(STAGE_I_CONFIGS))
def test_stage_1_matches_original(converted, name):
    original, folder = converted(name)
    params = STAGE_I_CONFIGS[name]
    unet = IFUNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, text, timesteps = _sample(params), _text(params), torch.tensor([3, 871])
    with torch.no_grad():
        expected = original(x, timesteps, text_emb=text)
        actual = unet(x, timesteps, encoder_hidden_states=text).sample
    assert actual.shape == expected.shape == (2, 6, params["image_size"], params["image_size"])
    assert relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize("name", ["base", "res_block_list_cross_only"])
def test_separate_pooled_text_matches_original_timestep_text_emb(converted, name):
    original, folder = converted(name)
    params = STAGE_I_CONFIGS[name]
    unet = IFUNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, text, style = _sample(params), _text(params), _text(params, length=5, seed=9)
    timesteps = torch.tensor([500, 20])
    with torch.no_grad():
        expected = original(x, timesteps, text_emb=text, timestep_text_emb=style)
        actual = unet(x, timesteps, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": style}).sample
        without_style = unet(x, timesteps, encoder_hidden_states=text).sample
    assert relative_error(actual, expected) < TOLERANCE
    assert relative_error(without_style, expected) > 1e-3  # the pooled text really changes the output


@pytest.mark.parametrize("name", sorted(STAGE_II_CONFIGS))
@pytest.mark.parametrize("aug_level", [0.0, 0.25, 0.7])
def test_super_resolution_matches_original(converted, name, aug_level):
    original, folder = converted(name)
    params = STAGE_II_CONFIGS[name]
    unet = IFSuperResUNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, text = _sample(params), _text(params)
    low_res = _sample({"image_size": params["image_size"] // 4}, seed=5).clamp(-1, 1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    original.low_res_diffusion.noise = noise  # the original's q_sample draws this instead of global noise
    timesteps = torch.tensor([999, 40])
    with torch.no_grad():
        expected = original(x, timesteps, low_res=low_res, aug_level=aug_level, text_emb=text)
        actual = unet(x, timesteps, encoder_hidden_states=text, low_res_image=low_res,
                      noise_level=int(aug_level * 1000), augmentation_noise=noise).sample  # fmt: skip
    assert actual.shape == (2, 6, params["image_size"], params["image_size"])
    assert relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize("name", sorted(STAGE_I_CONFIGS))
def test_stage_1_identical_to_stock_diffusers(converted, name):
    _, folder = converted(name)
    params = STAGE_I_CONFIGS[name]
    ours = IFUNet2DConditionModel.from_pretrained(folder / "unet").eval()
    stock = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, text, timesteps = _sample(params), _text(params), torch.tensor([10, 990])
    with torch.no_grad():
        assert torch.equal(ours(x, timesteps, text).sample, stock(x, timesteps, text).sample)


@pytest.mark.parametrize("name", sorted(STAGE_II_CONFIGS))
def test_super_resolution_identical_to_stock_diffusers(converted, name):
    """Both the stock call (6-channel sample, class_labels) and ours (low-res image, level, noise) agree with the
    stock class fed the input that diffusers' IF pipeline builds."""
    from diffusers import DDPMScheduler

    _, folder = converted(name)
    params = STAGE_II_CONFIGS[name]
    ours = IFSuperResUNet2DConditionModel.from_pretrained(folder / "unet").eval()
    stock = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    noising = DDPMScheduler.from_pretrained(folder / "image_noising_scheduler")
    x, text, timesteps, level = _sample(params), _text(params), torch.tensor([10, 990]), torch.tensor([250, 250])
    low_res = _sample({"image_size": params["image_size"] // 4}, seed=5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    upscaled = torch.nn.functional.interpolate(low_res, x.shape[-2:], mode="bilinear", align_corners=True)
    stock_input = torch.cat([x, noising.add_noise(upscaled, noise, level)], dim=1)
    with torch.no_grad():
        expected = stock(stock_input, timesteps, text, class_labels=level).sample
        assert torch.equal(ours(stock_input, timesteps, text, class_labels=level).sample, expected)
        explicit = ours(x, timesteps, text, low_res_image=low_res, noise_level=250, augmentation_noise=noise).sample
    assert torch.equal(explicit, expected)
