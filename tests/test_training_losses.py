"""IF's training objective against the original `GaussianDiffusion.training_losses`, and the super-resolution training
inputs against the original's augmentation and our UNet's own low-res path."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import deepfloyd_if.model.gaussian_diffusion as gd
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_unet
from deepfloyd_if.model.respace import create_gaussian_diffusion
from diffusers import DDPMScheduler

from if_diffusers.guidance import noise_augment
from if_diffusers.scheduling import denoising_scheduler, noising_scheduler
from if_diffusers.training import (
    diffusion_schedule,
    downsample,
    gaussian_blur,
    hybrid_loss,
    min_snr_weights,
    q_sample,
    sample_timesteps,
    super_resolution_inputs,
)

# What `IFBaseModule.get_diffusion("")` passes (its module is not imported: it needs torchvision and CLIP);
# test_original_settings_are_those_of_get_diffusion reads them from its source.
ORIGINAL_SETTINGS = dict(steps=1000, learn_sigma=True, sigma_small=False, noise_schedule="cosine", use_kl=False,
                         predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True)  # fmt: skip
STEPS = torch.tensor([0, 1, 2, 500, 998, 999])


@pytest.fixture(scope="module")
def original():
    return create_gaussian_diffusion(**ORIGINAL_SETTINGS, timestep_respacing="")


@pytest.fixture(scope="module")
def schedule():
    return diffusion_schedule(denoising_scheduler("I"))


def _float64_constants(tensor_from, timesteps, broadcast_shape):
    """The original's `_extract_into_tensor` without its `.float()`: its schedule then stays float64 end to end."""
    picked = torch.from_numpy(tensor_from).to(device=timesteps.device)[timesteps]
    return picked.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


def _batch(dtype: torch.dtype, seed: int = 0):
    """8-bit images in [-1, 1] (with pixels at -1 and 1, the decoder NLL's open bins), noise and a linear "model"
    whose epsilon and variance channels both depend on its input and step."""
    generator = torch.Generator().manual_seed(seed)
    x_start = torch.randint(0, 256, (len(STEPS), 3, 8, 8), generator=generator).to(dtype) / 127.5 - 1
    x_start[:, :, 0, 0], x_start[:, :, 0, 1] = -1.0, 1.0
    noise = torch.randn(x_start.shape, generator=generator, dtype=dtype)
    weight = torch.randn(6, 3, generator=generator, dtype=dtype) * 0.5

    def model(x, steps, **kwargs):
        out = torch.einsum("oc,bchw->bohw", weight, x)  # (B, 3, H, W) -> (B, 6, H, W)
        return torch.cat([out[:, :3], torch.tanh(out[:, 3:] + steps.to(dtype).view(-1, 1, 1, 1) / 1000)], dim=1)

    return x_start, noise, model


def test_original_settings_are_those_of_get_diffusion(original):
    """The oracle is built as the original builds it, and that gives RESCALED_MSE with learned-range variance."""
    base = Path(inspect.getfile(gd)).parent.parent / "modules" / "base.py"
    tree = ast.parse(base.read_text())
    method = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_diffusion")
    call = next(
        n
        for n in ast.walk(method)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "create_gaussian_diffusion"
    )
    passed = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "timestep_respacing"}
    assert passed == ORIGINAL_SETTINGS
    assert original.loss_type == gd.LossType.RESCALED_MSE
    assert original.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert original.model_mean_type == gd.ModelMeanType.EPSILON
    assert original.num_timesteps == 1000


def test_schedule_matches_original(original, schedule):
    """Float64 constants from our scheduler's config. rtol 1e-12, not 0: the original's SpacedDiffusion re-derives
    its betas from alphas_cumprod even when nothing is skipped (measured 2.7e-13)."""
    for name in ("betas", "alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):  # fmt: skip
        expected = torch.from_numpy(getattr(original, name))
        torch.testing.assert_close(getattr(schedule, name), expected, rtol=1e-12, atol=1e-15, msg=name)


def test_linear_schedule_matches_original():
    ours = diffusion_schedule(DDPMScheduler(beta_schedule="linear", variance_type="learned_range"))
    expected = torch.from_numpy(gd.get_named_beta_schedule("linear", 1000))
    torch.testing.assert_close(ours.betas, expected, rtol=1e-15, atol=0)  # torch and numpy linspace: 1 ulp apart


def test_hybrid_loss_matches_original_float64(original, schedule, monkeypatch):
    """Same x_start, noise and steps (t = 0 and T - 1 included); the model sees our `q_sample`, the original sees its
    own. The original casts schedule constants to float32 even for float64 inputs (measured: 1.4e-6 relative on the
    VB term), so it runs here with them kept in float64."""
    monkeypatch.setattr(gd, "_extract_into_tensor", _float64_constants)
    x_start, noise, model = _batch(torch.float64)
    expected = original.training_losses(model, x_start, STEPS, noise=noise)
    loss, terms = hybrid_loss(model(q_sample(x_start, noise, STEPS, schedule), STEPS), x_start, noise, STEPS, schedule)
    for name, ours in (("mse", terms["mse"]), ("vb", terms["vb"]), ("loss", loss)):
        torch.testing.assert_close(ours, expected[name], rtol=1e-12, atol=0, msg=name)


def test_hybrid_loss_matches_unmodified_original_float32(original):
    """In float32 the unmodified original and ours cast the same float64 constants the same way."""
    x_start, noise, model = _batch(torch.float32, seed=1)
    expected = original.training_losses(model, x_start, STEPS, noise=noise)
    scheduler = denoising_scheduler("I")  # the scheduler is accepted in place of its schedule
    loss, terms = hybrid_loss(model(q_sample(x_start, noise, STEPS, diffusion_schedule(scheduler)), STEPS),
                              x_start, noise, STEPS, scheduler)  # fmt: skip
    for name, ours in (("mse", terms["mse"]), ("vb", terms["vb"]), ("loss", loss)):
        torch.testing.assert_close(ours, expected[name], rtol=1e-6, atol=0, msg=name)


def test_vb_weight_scales_only_the_vb_term(schedule):
    x_start, noise, model = _batch(torch.float64)
    output = model(q_sample(x_start, noise, STEPS, schedule), STEPS)
    _, default = hybrid_loss(output, x_start, noise, STEPS, schedule)
    loss, halved = hybrid_loss(output, x_start, noise, STEPS, schedule, vb_weight=0.5)
    assert torch.equal(halved["mse"], default["mse"])
    torch.testing.assert_close(halved["vb"], default["vb"] * 0.5, rtol=1e-15, atol=0)
    torch.testing.assert_close(loss, halved["mse"] + halved["vb"], rtol=0, atol=0)


def test_gradients_reach_epsilon_only_through_mse_and_variance_only_through_vb(schedule):
    """As the original's `frozen_out = cat([model_output.detach(), model_var_values])`."""
    x_start, noise, model = _batch(torch.float64)
    output = model(q_sample(x_start, noise, STEPS, schedule), STEPS).detach().requires_grad_()
    for term, trained, frozen in (("mse", slice(0, 3), slice(3, 6)), ("vb", slice(3, 6), slice(0, 3))):
        _, terms = hybrid_loss(output, x_start, noise, STEPS, schedule)
        (grad,) = torch.autograd.grad(terms[term].sum(), output)
        assert torch.count_nonzero(grad[:, frozen]) == 0, term
        assert (grad[:, trained].abs().flatten(1).amax(1) > 0).all(), term


def test_one_optimizer_step_lowers_the_loss(schedule):
    """A tiny stage I UNet, one fixed batch: one SGD step on the hybrid loss lowers it."""
    unet = tiny_unet("I").train()
    generator = torch.Generator().manual_seed(0)
    x_start = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(x_start.shape, generator=generator)
    text = torch.randn(2, 4, 24, generator=generator)
    steps = sample_timesteps(2, generator, schedule.num_timesteps)
    x_t = q_sample(x_start, noise, steps, schedule)

    def loss() -> torch.Tensor:
        return hybrid_loss(unet(x_t, steps, text).sample, x_start, noise, steps, schedule)[0].mean()

    optimizer = torch.optim.SGD(unet.parameters(), lr=1e-3)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before, (before.item(), after.item())


def _inputs(**changes):
    x_start = torch.zeros(2, 3, 4, 4)
    inputs = dict(model_output=torch.zeros(2, 6, 4, 4), x_start=x_start, noise=torch.zeros_like(x_start),
                  timesteps=torch.tensor([0, 999]))  # fmt: skip
    return {**inputs, **changes}


@pytest.mark.parametrize(
    "changes, argument",
    [
        (dict(model_output=torch.zeros(2, 3, 4, 4)), "model_output"),  # epsilon only: no learned variance
        (dict(timesteps=torch.tensor([0, 1000])), "timesteps"),
        (dict(timesteps=torch.tensor([-1, 5])), "timesteps"),
        (dict(timesteps=torch.tensor([0.0, 5.0])), "timesteps"),
        (dict(timesteps=torch.tensor([0])), "timesteps"),
        (dict(x_start=torch.full((2, 3, 4, 4), 1.5)), "x_start"),  # [0, 255] / 170 or so: not in [-1, 1]
        (dict(noise=torch.zeros(2, 3, 4, 5)), "noise"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(schedule, changes, argument):
    with pytest.raises(ValueError, match=argument):
        hybrid_loss(**_inputs(**changes), schedule=schedule)


def test_schedule_rejects_settings_that_are_not_ifs():
    with pytest.raises(ValueError, match="variance_type"):
        diffusion_schedule(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))  # fixed_small, as the noising scheduler
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion_schedule(DDPMScheduler(beta_schedule="scaled_linear", variance_type="learned_range"))


def test_sample_timesteps_is_uniform_and_reproducible():
    draw = sample_timesteps(20_000, torch.Generator().manual_seed(3), 10)
    assert torch.equal(draw, sample_timesteps(20_000, torch.Generator().manual_seed(3), 10))
    assert draw.dtype == torch.int64 and draw.min() == 0 and draw.max() == 9
    counts = torch.bincount(draw, minlength=10).double()
    assert ((counts - 2000).abs() < 200).all(), counts  # binomial sd ~42: 200 is ~5 sd


def test_sample_timesteps_bias_draws_the_noisiest_steps_more_often():
    """Portion 0.2 and multiplier 4 over 10 steps: steps 8 and 9 each drawn with probability 4/16, the others 1/16;
    portion 0 or multiplier 1 keeps the uniform draws bit for bit; bad settings raise naming the argument."""
    draw = sample_timesteps(32_000, torch.Generator().manual_seed(3), 10, bias_portion=0.2, bias_multiplier=4.0)
    counts = torch.bincount(draw, minlength=10).double()
    expected = torch.tensor([2000.0] * 8 + [8000.0] * 2, dtype=torch.float64)
    assert ((counts - expected).abs() < 5 * expected.sqrt()).all(), counts  # ~5 binomial sd
    uniform = sample_timesteps(500, torch.Generator().manual_seed(4), 10)
    for portion, multiplier in ((0.0, 4.0), (0.2, 1.0)):
        same = sample_timesteps(500, torch.Generator().manual_seed(4), 10, portion, multiplier)
        assert torch.equal(same, uniform)
    for name, portion, multiplier in (("bias_portion", 1.5, 4.0), ("bias_portion", -0.1, 4.0),
                                      ("bias_multiplier", 0.2, 0.0), ("bias_multiplier", 0.2, True)):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{name}="):
            sample_timesteps(4, torch.Generator(), 10, portion, multiplier)


def _original_degradation(original, target, levels, noise):
    """Bicubic antialiased down x4, bilinear (align_corners) up, then the original's `q_sample`: what
    `SuperResUNetModel.forward(low_res=...)` does with its `low_res_diffusion` (a 1000-step cosine diffusion)."""
    low = F.interpolate(target, (8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
    upsampled = F.interpolate(low, (32, 32), mode="bilinear", align_corners=True)
    return original.q_sample(upsampled, levels, noise=noise)


def test_super_resolution_inputs_match_the_original_augmentation_float64(original, schedule, monkeypatch):
    """Exact with a float64 schedule on both sides (the original's constants kept float64, as above)."""
    monkeypatch.setattr(gd, "_extract_into_tensor", _float64_constants)
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    levels, noise = torch.tensor([0, 250, 999]), torch.randn(target.shape, generator=generator, dtype=torch.float64)
    augmented, returned = super_resolution_inputs(target, schedule.alphas_cumprod, noise_level=levels, noise=noise)
    torch.testing.assert_close(augmented, _original_degradation(original, target, levels, noise), rtol=1e-12, atol=0)
    assert torch.equal(returned, levels)


def test_super_resolution_inputs_float32_gap_to_the_original(original):
    """With the noising scheduler's float32 `alphas_cumprod` (the `add_noise` convention our sampling and UNet use),
    `1 - a_t` at low levels keeps ~3 digits in float32: measured gap 6.2e-6 at level 0 (1/1300 of an 8-bit step)."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    levels, noise = torch.tensor([0, 250, 999]), torch.randn(target.shape, generator=generator)
    augmented, _ = super_resolution_inputs(target, noising_scheduler().alphas_cumprod, noise_level=levels, noise=noise)
    expected = _original_degradation(original, target, levels, noise)
    torch.testing.assert_close(augmented[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(augmented[1:], expected[1:], rtol=0, atol=1e-6)


def test_super_resolution_inputs_feed_the_unet_as_its_low_res_path():
    """The stock call with our inputs equals our UNet's own call with the clean low-res image (same noise, levels)."""
    unet = tiny_unet("II").eval()
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    sample, text = torch.randn(2, 3, 32, 32, generator=generator), torch.randn(2, 4, 24, generator=generator)
    augmented, levels = super_resolution_inputs(target, unet.noise_augmentation_alphas_cumprod, generator)
    # replay the generator to get the levels, then the noise, that super_resolution_inputs drew
    replay = torch.Generator().manual_seed(1)
    torch.rand(2, 3, 32, 32, generator=replay), torch.randn(2, 3, 32, 32, generator=replay)
    torch.randn(2, 4, 24, generator=replay)
    assert torch.equal(levels, sample_timesteps(2, replay, 1000))
    noise = torch.randn(target.shape, generator=replay)
    with torch.no_grad():
        stock = unet(torch.cat([sample, augmented], dim=1), 10, text, class_labels=levels).sample
        own = unet(sample, 10, text, low_res_image=downsample(target), noise_level=levels,
                   augmentation_noise=noise).sample  # fmt: skip
    assert torch.equal(stock, own)
    assert levels[0] != levels[1]  # one level per sample


def test_super_resolution_inputs_cap_the_augmentation_level():
    """`max_noise_level=350` draws levels on `[0, 350)` (the Stable Diffusion x4 upscaler's training range) from the
    same generator calls; the full length gives the uncapped draws bit for bit; bad caps raise naming the argument."""
    alphas_cumprod = noising_scheduler().alphas_cumprod
    target = torch.rand(2000, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, capped = super_resolution_inputs(target, alphas_cumprod, torch.Generator().manual_seed(1), max_noise_level=350)
    assert capped.min() == 0 and capped.max() == 349, (capped.min(), capped.max())
    assert (capped < 175).float().mean().sub(0.5).abs() < 0.05  # uniform: half below the middle (sd 0.011)
    uncapped = super_resolution_inputs(target[:4], alphas_cumprod, torch.Generator().manual_seed(2))
    full = super_resolution_inputs(target[:4], alphas_cumprod, torch.Generator().manual_seed(2), max_noise_level=1000)
    assert all(torch.equal(a, b) for a, b in zip(uncapped, full))
    for cap in (0, 1001, 350.0, True):
        with pytest.raises(ValueError, match=f"^max_noise_level={cap!r}"):
            super_resolution_inputs(target[:2], alphas_cumprod, torch.Generator(), max_noise_level=cap)
    with pytest.raises(ValueError, match="max_noise_level applies to drawn levels"):
        super_resolution_inputs(target[:2], alphas_cumprod, torch.Generator(), noise_level=torch.tensor([0, 1]),
                                max_noise_level=350)  # fmt: skip


def test_super_resolution_inputs_blur_the_low_res_image_after_the_same_draws():
    """`max_blur` blurs the downsampled image by one standard deviation per sample, uniform on `[0, max_blur)` and
    drawn after the levels and the noise, which stay those of the unblurred call; bad values raise naming it."""
    alphas_cumprod = noising_scheduler().alphas_cumprod
    target = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain, levels = super_resolution_inputs(target, alphas_cumprod, torch.Generator().manual_seed(1))
    blurred, blurred_levels = super_resolution_inputs(target, alphas_cumprod, torch.Generator().manual_seed(1),
                                                      max_blur=1.5)  # fmt: skip
    replay = torch.Generator().manual_seed(1)
    sample_timesteps(4, replay, 1000)
    noise = torch.randn(target.shape, generator=replay)
    sigma = torch.rand(4, generator=replay) * 1.5
    low_res = F.interpolate(gaussian_blur(downsample(target), sigma), (32, 32), mode="bilinear", align_corners=True)
    torch.testing.assert_close(blurred, noise_augment(low_res, noise, levels, alphas_cumprod))
    assert torch.equal(levels, blurred_levels) and (blurred - plain).abs().amax() > 0.05
    for bad in (0, -1.0, 4.5, True, "1"):
        with pytest.raises(ValueError, match=f"^max_blur={bad!r}"):
            super_resolution_inputs(target, alphas_cumprod, torch.Generator(), max_blur=bad)


def test_gaussian_blur_is_a_normalised_gaussian_per_sample():
    """An impulse blurred at sigma 1 is the outer product of the normalised 7-tap Gaussian; sigma 0 leaves an image
    unchanged; each sample of a batch gets its own sigma; a wrong sigma shape raises."""
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[..., 7, 7] = 1.0
    taps = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    taps /= taps.sum()
    blurred = gaussian_blur(impulse, torch.tensor([1.0]))
    torch.testing.assert_close(blurred[0, 0, 4:11, 4:11], taps[:, None] * taps[None, :])
    assert torch.equal(gaussian_blur(impulse, torch.tensor([0.0])), impulse)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    both = gaussian_blur(images, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(both[1:], gaussian_blur(images[1:], torch.tensor([2.0])))
    torch.testing.assert_close(both[:1], gaussian_blur(images[:1], torch.tensor([0.5])), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sigma has shape"):
        gaussian_blur(images, torch.tensor([1.0]))


def test_super_resolution_inputs_reject_bad_inputs():
    alphas_cumprod = noising_scheduler().alphas_cumprod
    with pytest.raises(ValueError, match="noise_level"):
        super_resolution_inputs(torch.zeros(2, 3, 8, 8), alphas_cumprod, noise_level=torch.tensor([0, 1000]),
                                noise=torch.zeros(2, 3, 8, 8))  # fmt: skip
    with pytest.raises(ValueError, match="target"):
        super_resolution_inputs(torch.full((2, 3, 8, 8), 2.0), alphas_cumprod, torch.Generator())
    with pytest.raises(ValueError, match="scale"):
        super_resolution_inputs(torch.zeros(2, 3, 10, 10), alphas_cumprod, torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        super_resolution_inputs(torch.zeros(2, 3, 8, 8), alphas_cumprod)
    with pytest.raises(TypeError, match="generator"):  # the blur is drawn even when the level and noise are given
        super_resolution_inputs(torch.zeros(2, 3, 8, 8), alphas_cumprod, noise_level=torch.tensor([0, 1]),
                                noise=torch.zeros(2, 3, 8, 8), max_blur=1.0)  # fmt: skip


def test_min_snr_weights_clamp_the_signal_to_noise_ratio_at_gamma(schedule):
    """`min(SNR, gamma) / SNR` from the cosine schedule, computed here in float64 from alpha_bar: 1 for the noisy steps
    (SNR <= gamma), `gamma / SNR` < 1 for the nearly clean ones, falling as the noise falls."""
    steps = torch.arange(1000)
    weights = min_snr_weights(steps, schedule, 5.0)
    alpha_bar = schedule.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.where(snr <= 5.0, torch.ones_like(snr), 5.0 / snr)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
    noisy, clean = snr <= 5.0, snr > 5.0
    assert noisy.any() and clean.any() and (weights[noisy] == 1).all() and (weights[clean] < 1).all()
    assert (weights[clean].diff() >= 0).all()  # clean steps come first: weights rise towards 1 with t
    for gamma in (0, -1.0, True, "5"):
        with pytest.raises(ValueError, match="^gamma="):
            min_snr_weights(steps, schedule, gamma)


def test_v_prediction_loss_is_the_epsilon_loss_of_the_same_denoiser():
    """A v-predicting model and the epsilon model it implies (`eps = sqrt(a) v + sqrt(1 - a) x_t`) are one denoiser:
    the v error is the epsilon error / sqrt(a) per sample, so the v MSE times `a_t` is the epsilon MSE, and the VB
    term (which reads epsilon, checked against the original above) is the same."""
    x_start, noise, model = _batch(torch.float64)
    epsilon = diffusion_schedule(denoising_scheduler("I"))
    v_schedule = diffusion_schedule(denoising_scheduler("I", "v_prediction"))
    assert v_schedule.to("cpu").prediction_type == "v_prediction" and epsilon.prediction_type == "epsilon"
    x_t = q_sample(x_start, noise, STEPS, v_schedule)
    v_output = model(x_t, STEPS)
    alpha_bar = epsilon.alphas_cumprod[STEPS].view(-1, 1, 1, 1)
    as_epsilon = torch.cat([alpha_bar.sqrt() * v_output[:, :3] + (1 - alpha_bar).sqrt() * x_t, v_output[:, 3:]], 1)
    v_loss, v_terms = hybrid_loss(v_output, x_start, noise, STEPS, v_schedule)
    eps_loss, eps_terms = hybrid_loss(as_epsilon, x_start, noise, STEPS, epsilon)
    torch.testing.assert_close(v_terms["mse"] * alpha_bar.flatten(), eps_terms["mse"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(v_terms["vb"], eps_terms["vb"], rtol=1e-9, atol=1e-12)
    # the v target: the exact v gives zero MSE, and x_0 = sqrt(a) x_t - sqrt(1 - a) v recovers the images
    exact_v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_start
    _, exact = hybrid_loss(torch.cat([exact_v, v_output[:, 3:]], 1), x_start, noise, STEPS, v_schedule)
    assert exact["mse"].abs().max() < 1e-20
    torch.testing.assert_close(alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * exact_v, x_start)
    assert not torch.allclose(v_terms["mse"], eps_terms["mse"])  # the two MSEs do differ: a_t is not 1


def test_min_snr_weights_of_v_prediction_weigh_the_same_epsilon_error_alike():
    """diffusers' v form, `min(SNR, gamma) / (SNR + 1)`: times the v MSE (the epsilon MSE / a_t) it is the epsilon
    weight times the epsilon MSE, at every step."""
    steps = torch.arange(1000)
    epsilon = diffusion_schedule(denoising_scheduler("I"))
    v_schedule = diffusion_schedule(denoising_scheduler("I", "v_prediction"))
    alpha_bar = epsilon.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar)
    v_weights = min_snr_weights(steps, v_schedule, 5.0).double()
    torch.testing.assert_close(v_weights, snr.clamp(max=5.0) / (snr + 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(v_weights / alpha_bar, min_snr_weights(steps, epsilon, 5.0).double(), rtol=1e-5, atol=0)


def test_prediction_types_other_than_epsilon_and_v_are_rejected():
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        diffusion_schedule(DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                                         prediction_type="sample"))  # fmt: skip
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        denoising_scheduler("II", "sample")
