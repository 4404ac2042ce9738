"""The IF UNet classes: stock compatibility, the text cache, super-resolution inputs and presets."""

from __future__ import annotations

import pytest
import torch
from conftest import ORIGINAL_BASE, STAGE_II_CONFIGS
from diffusers import DDPMScheduler, UNet2DConditionModel

from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.models import PRESETS
from if_diffusers.models.original_params import OriginalUNetParams


def _tiny(cls, params=ORIGINAL_BASE, seed=0):
    torch.manual_seed(seed)
    return cls.from_config(OriginalUNetParams.parse(params).to_unet_config()).eval()


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.fixture
def stage_1():
    return _tiny(IFUNet2DConditionModel)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 7, 24, generator=generator)


# --- diffusers' own DeepFloyd layout -------------------------------------------------------------------------


@pytest.mark.parametrize("cls, params", [(IFUNet2DConditionModel, ORIGINAL_BASE),
                                         (IFSuperResUNet2DConditionModel, STAGE_II_CONFIGS["super_res"])])  # fmt: skip
def test_stock_unet_folder_loads_unchanged(tmp_path, cls, params):
    torch.manual_seed(0)
    stock = UNet2DConditionModel(**OriginalUNetParams.parse(params).to_unet_config()).eval()
    stock.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors, as diffusers writes them
    stock, ours = UNet2DConditionModel.from_pretrained(tmp_path).eval(), cls.from_pretrained(tmp_path).eval()
    assert set(ours.state_dict()) == set(stock.state_dict())
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in stock.state_dict().items())
    public = {k: v for k, v in stock.config.items() if not k.startswith("_")}
    assert {k: v for k, v in ours.config.items() if k in public} == public
    x = torch.randn(1, params["in_channels"], 16, 16)
    text, labels = (
        torch.randn(1, 5, params["encoder_dim"]),
        torch.tensor([100]) if cls is not IFUNet2DConditionModel else None,
    )
    with torch.no_grad():
        assert torch.equal(ours(x, 3, text, class_labels=labels).sample, stock(x, 3, text, class_labels=labels).sample)


def test_saved_config_is_a_superset_that_stock_diffusers_reads(tmp_path):
    ours = _tiny(IFSuperResUNet2DConditionModel, STAGE_II_CONFIGS["super_res"])
    ours.save_pretrained(tmp_path)
    stock = UNet2DConditionModel.from_pretrained(tmp_path)
    stock_keys = UNet2DConditionModel._get_init_keys(UNet2DConditionModel) - {"self"}
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert {k for k in ours.config if not k.startswith("_")} - stock_keys == {
        "noise_augmentation_beta_schedule",
        "noise_augmentation_num_train_timesteps",
    }
    reloaded = IFSuperResUNet2DConditionModel.from_pretrained(tmp_path, noise_augmentation_num_train_timesteps=500)
    assert reloaded.noise_augmentation_alphas_cumprod.shape == (500,)
    assert "noise_augmentation_alphas_cumprod" not in ours.state_dict()


# --- the text cache ------------------------------------------------------------------------------------------


def test_text_cache_computes_projection_and_pooling_once_per_generation(stage_1, inputs):
    x, text = inputs
    pooling, projection = CallCounter(stage_1.add_embedding), CallCounter(stage_1.encoder_hid_proj)
    with torch.no_grad():
        uncached = [stage_1(x, t, text).sample for t in (999, 500, 1)]
        assert (pooling.calls, projection.calls) == (3, 3)
        with stage_1.text_cache():
            cached = [stage_1(x, t, text).sample for t in (999, 500, 1)]
    assert (pooling.calls, projection.calls) == (4, 4)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    assert stage_1._text_cache_entries is None  # leaving the block drops the cache


def test_text_cache_is_never_stale(stage_1, inputs):
    x, text = inputs
    with torch.no_grad():
        with stage_1.text_cache():
            first = stage_1(x, 10, text).sample
            other_prompt = stage_1(x, 10, text.flip(0).clone()).sample
            text.mul_(2)  # the same tensor changed in place is a different prompt too
            doubled = stage_1(x, 10, text).sample
            style = torch.randn(2, 3, 24)
            styled = stage_1(x, 10, text, added_cond_kwargs={"text_embeds": style}).sample
        assert torch.equal(other_prompt, stage_1(x, 10, text.div(2).flip(0)).sample)
        assert torch.equal(doubled, stage_1(x, 10, text).sample)
        assert torch.equal(styled, stage_1(x, 10, text, added_cond_kwargs={"text_embeds": style}).sample)
        assert not torch.equal(first, doubled)


def test_text_cache_explicit_clear_and_nesting(stage_1, inputs):
    x, text = inputs
    pooling = CallCounter(stage_1.add_embedding)
    with torch.no_grad(), stage_1.text_cache():
        stage_1(x, 10, text)
        with stage_1.text_cache():
            stage_1(x, 20, text)
        stage_1(x, 30, text)  # the inner block's exit must not drop the outer generation's cache
        assert pooling.calls == 1
        stage_1.clear_text_cache()
        stage_1(x, 40, text)
    assert pooling.calls == 2


def test_text_cache_is_bypassed_while_training(stage_1, inputs):
    x, text = inputs
    pooling = CallCounter(stage_1.add_embedding)
    with stage_1.text_cache():
        for t in (10, 20):
            stage_1(x, t, text).sample.mean().backward()  # a cached graph would fail on the second backward
    assert pooling.calls == 2


def test_text_cache_with_inference_tensors(stage_1, inputs):
    """Inside inference mode an inference tensor may change in place untracked, so it is never cached there;
    outside it such a tensor is immutable and identity suffices."""
    x, text = inputs
    pooling = CallCounter(stage_1.add_embedding)
    with torch.inference_mode():
        text = text.clone()
        with stage_1.text_cache():
            before = stage_1(x, 10, text).sample
            text.mul_(2)
            after = stage_1(x, 10, text).sample
        assert not torch.equal(before, after) and pooling.calls == 2
    with torch.no_grad(), stage_1.text_cache():
        a = stage_1(x, 10, text).sample
        stage_1(x, 20, text)
    assert pooling.calls == 3 and torch.equal(a, after)


def test_text_cache_is_bypassed_while_compiling(stage_1, inputs):
    x, text = inputs
    compiled = torch.compile(stage_1, backend="eager", fullgraph=True)
    with torch.no_grad(), stage_1.text_cache():
        assert torch.allclose(compiled(x, 10, text).sample, stage_1(x, 10, text).sample, atol=1e-6)


def test_pooled_text_batch_is_checked(stage_1, inputs):
    x, text = inputs
    with pytest.raises(ValueError, match=r"text_embeds'\] has batch 3; expected the sample's batch 2"):
        stage_1(x, 10, text, added_cond_kwargs={"text_embeds": torch.randn(3, 4, 24)})


# --- super-resolution inputs ---------------------------------------------------------------------------------


@pytest.fixture
def super_res():
    return _tiny(IFSuperResUNet2DConditionModel, STAGE_II_CONFIGS["super_res"])


def test_super_resolution_forward_draws_no_random_numbers(super_res):
    x, low, text, noise = (
        torch.randn(2, 3, 32, 32),
        torch.rand(2, 3, 8, 8) * 2 - 1,
        torch.randn(2, 4, 24),
        torch.randn(2, 3, 32, 32),
    )
    with torch.no_grad():
        torch.manual_seed(0)
        a = super_res(x, 5, text, low_res_image=low, noise_level=torch.tensor([100, 300]), augmentation_noise=noise)
        state = torch.get_rng_state()
        b = super_res(x, 5, text, low_res_image=low, noise_level=torch.tensor([100, 300]), augmentation_noise=noise)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.sample, b.sample)


def test_augmentation_schedule_survives_meta_builds():
    model = IFSuperResUNet2DConditionModel.from_preset("IF-II-M", device="meta").to_empty(device="cpu")
    expected = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.equal(model.noise_augmentation_alphas_cumprod, expected)
    assert model._alphas_cumprod_on(torch.device("cpu")).device.type == "cpu"


def test_defaulted_augmentation_keys_are_recorded():
    model = _tiny(IFSuperResUNet2DConditionModel, STAGE_II_CONFIGS["super_res"])
    assert {"noise_augmentation_beta_schedule", "noise_augmentation_num_train_timesteps"} <= set(
        model.config["_use_default_values"]
    )


def test_super_resolution_noise_level_is_per_sample(super_res):
    x, low, text, noise = (
        torch.randn(2, 3, 32, 32),
        torch.rand(2, 3, 8, 8),
        torch.randn(2, 4, 24),
        torch.randn(2, 3, 32, 32),
    )
    with torch.no_grad():
        mixed = super_res(
            x, 5, text, low_res_image=low, noise_level=torch.tensor([0, 900]), augmentation_noise=noise
        ).sample
        low_level = super_res(x, 5, text, low_res_image=low, noise_level=0, augmentation_noise=noise).sample
        high_level = super_res(x, 5, text, low_res_image=low, noise_level=900, augmentation_noise=noise).sample
    assert torch.equal(mixed[0], low_level[0]) and torch.equal(mixed[1], high_level[1])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sample": torch.randn(2, 6, 32, 32)}, "sample has 6 channels; with low_res_image expected 3"),
        ({"class_labels": torch.tensor([1, 1])}, "class_labels was given with low_res_image"),
        (
            {"low_res_image": torch.randn(2, 1, 8, 8)},
            r"low_res_image has shape \(2, 1, 8, 8\); expected \(2, 3, h, w\)",
        ),
        ({"augmentation_noise": None}, "needs noise_level and augmentation_noise"),
        ({"augmentation_noise": torch.randn(2, 3, 8, 8)}, r"augmentation_noise has shape \(2, 3, 8, 8\); expected"),
        ({"noise_level": 0.25}, "noise_level has dtype torch.float32"),
        ({"noise_level": -1}, r"noise_level=-1: expected an augmentation level in \[0, 1000\)"),
        ({"noise_level": 1000}, r"noise_level=1000: expected an augmentation level in \[0, 1000\)"),
        ({"noise_level": torch.tensor([1, 2, 3])}, r"noise_level .* shape \(3,\); expected an int or \(2,\) integers"),
    ],
)
def test_super_resolution_bad_inputs(super_res, overrides, message):
    kwargs = {
        "sample": torch.randn(2, 3, 32, 32),
        "timestep": 5,
        "encoder_hidden_states": torch.randn(2, 4, 24),
        "low_res_image": torch.randn(2, 3, 8, 8),
        "noise_level": 250,
        "augmentation_noise": torch.randn(2, 3, 32, 32),
    }
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        super_res(**kwargs)


def test_super_resolution_rejects_augmentation_without_low_res(super_res):
    with pytest.raises(ValueError, match="only apply with low_res_image"):
        super_res(torch.randn(1, 6, 32, 32), 5, torch.randn(1, 4, 24), class_labels=torch.tensor([3]), noise_level=3)


# --- presets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, name, count", [(IFUNet2DConditionModel, "IF-I-XL", 4_304_695_110),
                                              (IFSuperResUNet2DConditionModel, "IF-II-L", 1_243_277_190)])  # fmt: skip
def test_exact_presets_have_the_published_parameter_counts(cls, name, count):
    model = cls.from_preset(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("cls, name, published", [(IFUNet2DConditionModel, "IF-I-L", 900e6),
                                                  (IFUNet2DConditionModel, "IF-I-M", 400e6),
                                                  (IFSuperResUNet2DConditionModel, "IF-II-M", 450e6)])  # fmt: skip
def test_inferred_presets_are_near_published_counts_and_say_so(cls, name, published):
    count = sum(p.numel() for p in cls.from_preset(name, device="meta").parameters())
    assert abs(count - published) / published < 0.1
    assert not PRESETS[name].exact and "inferred" in PRESETS[name].note
    assert name in cls.from_preset.__doc__ and "inferred" in cls.from_preset.__doc__


def test_preset_builds_real_weights_and_dtype():
    model = IFUNet2DConditionModel.from_preset("IF-I-M", dtype=torch.float16)
    assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float16
    assert model.config.block_out_channels == [192, 384, 576, 768]


def test_preset_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"name='IF-I-XXL' is not a preset: expected one of \['IF-I-L'"):
        IFUNet2DConditionModel.from_preset("IF-I-XXL")
    with pytest.raises(ValueError, match="stage-II preset.*use IFSuperResUNet2DConditionModel.from_preset"):
        IFUNet2DConditionModel.from_preset("IF-II-L", device="meta")
    with pytest.raises(ValueError, match="stage-I preset.*use IFUNet2DConditionModel.from_preset"):
        IFSuperResUNet2DConditionModel.from_preset("IF-I-XL", device="meta")
