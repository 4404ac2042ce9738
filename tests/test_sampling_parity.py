"""Our stage-I and stage-II pipelines sample what the original `deepfloyd_if` sampling loop samples.

A converted tiny checkpoint runs through our pipeline and, with the original weights, through the original
`GaussianDiffusion` loop (`ddim_sample_loop` / `p_sample_loop` of the respaced cosine diffusion, called as
`IFBaseModule.embeddings_to_image` calls them). Both sides get the same T5 embeddings, the same initial noise, the
same augmentation noise (stage II) and, for DDPM, the same per-step noise, so what is left to differ is the sampling
maths: respacing, guidance over learned variance, dynamic thresholding, DDIM's re-derived epsilon.
"""

from __future__ import annotations

import pytest
import torch
from deepfloyd_if.model import gaussian_diffusion
from deepfloyd_if.model.respace import create_gaussian_diffusion
from diffusers import DDIMScheduler

import if_diffusers.scheduling
from if_diffusers import IFPipeline, IFSuperResolutionPipeline, IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.timesteps import RESPACING_PRESETS, resolve_timesteps

TOLERANCE = 1e-4  # max abs, float32
PROMPTS = ["a red circle on a blue background", "a small green square at the top left"]
SEED = 0

# stage -> (converted config, pipeline, UNet class, guidance scale, dynamic thresholding c): the original's defaults
# (`IFStageI` / `IFStageII.embeddings_to_image`; p = 0.95 at both).
STAGES = {
    "I": ("base", IFPipeline, IFUNet2DConditionModel, 7.0, 1.5),
    "II": ("super_res", IFSuperResolutionPipeline, IFSuperResUNet2DConditionModel, 4.0, 1.0),
}
AUG_LEVEL = 0.25  # the original's stage-II default; our noise_level = aug_level * 1000
LOW_RES_SIZE = 8  # stage II: 8x8 -> 32x32, the "super_res" config's image_size
DDIM_STEPS = 10  # the original's "ddim10"
DDPM_RESPACING = "smart27"


def _original_diffusion(respacing: str):
    """What `IFBaseModule.get_diffusion(respacing)` builds (not imported: its module loads CLIP from the hub)."""
    return create_gaussian_diffusion(
        steps=1000, learn_sigma=True, sigma_small=False, noise_schedule="cosine", use_kl=False,
        predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
        timestep_respacing=RESPACING_PRESETS.get(respacing, respacing),
    )  # fmt: skip


def _original_model_fn(model, guidance_scale: float):
    """`model_fn` of `IFBaseModule.embeddings_to_image` without a positive prompt: the batch is `[cond, uncond]`,
    only its first half is denoised, guidance acts on the 3 epsilon channels and each half keeps its own variance.
    `(2B, 3, H, W)` -> `(2B, 6, H, W)`."""

    def model_fn(x_t, ts, **kwargs):
        half = x_t[: len(x_t) // 2]
        model_out = model(torch.cat([half, half]), ts, **kwargs)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    return model_fn


class _NoiseQueue:
    """Hands out a fixed list of `(B, 3, H, W)` noise tensors in order; for the original's `(2B, 3, H, W)` batch it
    repeats them (only the first, cond half is kept)."""

    def __init__(self, noises: list[torch.Tensor]):
        self.noises, self.used = noises, 0

    def draw(self, shape) -> torch.Tensor:
        if self.used == len(self.noises):
            raise AssertionError(f"drew more than the {len(self.noises)} prepared noise tensors")
        self.used += 1
        noise = self.noises[self.used - 1]
        return noise.repeat(shape[0] // noise.shape[0], 1, 1, 1)


@pytest.fixture(scope="module")
def embeddings(pipeline_components):
    """T5 embeddings `(B, L, 24)` of the prompts and of "" from our `encode_prompt`, given to both sides."""
    return IFPipeline(**pipeline_components("I")).encode_prompt(PROMPTS)


def _pipeline(stage: str, converted, pipeline_components, sampler: str):
    """Our pipeline for `stage` with the converted UNet, and the original model with the same weights."""
    name, cls, unet_cls, _, _ = STAGES[stage]
    original, folder = converted(name)
    components = dict(pipeline_components(stage), unet=unet_cls.from_pretrained(folder / "unet").eval())
    if sampler == "ddim":
        # The original's "ddimN": N steps strided by 1000 // N from 0 ("leading", no offset); abar_prev = 1 after
        # the last. Made from IF's DDPM config as a user would (it carries variance_type="learned_range").
        components["scheduler"] = DDIMScheduler.from_config(
            components["scheduler"].config, timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True
        )
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, original


def _low_res() -> torch.Tensor:
    """Stage II input `(B, 3, 8, 8)` in `[-1, 1]`."""
    generator = torch.Generator().manual_seed(5)
    return torch.rand(len(PROMPTS), 3, LOW_RES_SIZE, LOW_RES_SIZE, generator=generator) * 2 - 1


def _pipeline_noise(stage: str, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What our pipeline draws from `torch.Generator().manual_seed(SEED)`: the initial noise `(B, 3, H, W)`, then at
    stage II the augmentation noise of the upsampled low-res image (diffusers' draw order, which
    test_pipeline_parity pins)."""
    generator = torch.Generator().manual_seed(SEED)
    initial = torch.randn(len(PROMPTS), 3, size, size, generator=generator)
    augmentation = torch.randn(len(PROMPTS), 3, size, size, generator=generator) if stage == "II" else None
    return initial, augmentation


def _run_ours(pipe, stage: str, embeddings, **call) -> torch.Tensor:
    """Our images `(B, 3, H, W)` before post-processing."""
    prompt_embeds, negative_prompt_embeds = embeddings
    extra = {"image": _low_res(), "noise_level": int(AUG_LEVEL * 1000)} if stage == "II" else {}
    return pipe(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, guidance_scale=STAGES[stage][3],
        generator=torch.Generator().manual_seed(SEED), output_type="pt", **extra, **call,
    ).images  # fmt: skip


def _run_original(original, stage: str, sample_loop, size: int, embeddings) -> torch.Tensor:
    """The original's `sample_loop` as `embeddings_to_image` calls it, from our pipeline's noise; returns the first
    (cond) half of its `[cond, uncond]` batch."""
    _, _, _, guidance_scale, threshold_c = STAGES[stage]
    prompt_embeds, negative_prompt_embeds = embeddings
    initial, augmentation = _pipeline_noise(stage, size)
    model_kwargs = {"text_emb": torch.cat([prompt_embeds, negative_prompt_embeds]), "timestep_text_emb": None,
                    "use_cache": True}  # fmt: skip
    if stage == "II":
        model_kwargs.update(low_res=torch.cat([_low_res()] * 2), aug_level=AUG_LEVEL)
        # Ours augments once and feeds the same augmented image to both guidance halves.
        original.low_res_diffusion.noise = torch.cat([augmentation] * 2)
    original.cache = None  # `_clear_cache`, before and after sampling
    try:
        with torch.no_grad():
            sample = sample_loop(
                _original_model_fn(original, guidance_scale), (2 * len(initial), 3, size, size),
                noise=torch.cat([initial] * 2), clip_denoised=True, dynamic_thresholding_p=0.95,
                dynamic_thresholding_c=threshold_c, model_kwargs=model_kwargs, device=initial.device,
            )  # fmt: skip
    finally:
        original.cache = None
        if stage == "II":
            original.low_res_diffusion.noise = None
    return sample[: len(initial)]


@pytest.mark.parametrize("respacing", [*sorted(RESPACING_PRESETS), "ddim10", "ddim25", "3,7,1,12"])
def test_timesteps_are_the_originals_timestep_map(respacing):
    """The timesteps our pipelines run for a respacing are the original's kept steps (`timestep_map`), so both
    samplers visit the same noise levels."""
    expected = sorted(_original_diffusion(respacing).timestep_map, reverse=True)
    assert resolve_timesteps(respacing, 1000) == expected


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_ddim_matches_original_ddim_sample_loop(stage, converted, pipeline_components, embeddings):
    """DDIM with eta = 0 is deterministic given the initial noise: our pipeline with `DDIMScheduler.from_config` of
    its own scheduler over 10 "leading" steps (900, 800, ..., 0) must give the original's `ddim_sample_loop` over
    "ddim10", whose respaced `alphas_cumprod_prev` is the next kept step's (1 after step 0) and whose epsilon is
    re-derived from the dynamically thresholded x0 (our `use_clipped_model_output=True`)."""
    pipe, original = _pipeline(stage, converted, pipeline_components, "ddim")
    size = pipe.unet.config.sample_size
    ours = _run_ours(pipe, stage, embeddings, num_inference_steps=DDIM_STEPS)
    diffusion = _original_diffusion(f"ddim{DDIM_STEPS}")
    assert pipe.scheduler.timesteps.tolist() == sorted(diffusion.timestep_map, reverse=True)
    expected = _run_original(original, stage, diffusion.ddim_sample_loop, size, embeddings)
    assert ours.shape == expected.shape == (len(PROMPTS), 3, size, size)
    error = (ours - expected).abs().max().item()
    assert error < TOLERANCE, f"max abs error {error:.3g}"


@pytest.mark.parametrize("stage", ["I", "II"])
def test_ddpm_matches_original_p_sample_loop(stage, converted, pipeline_components, embeddings,
                                              monkeypatch):  # fmt: skip
    """Ancestral DDPM with learned-range variance over "smart27": the original's respaced betas
    `1 - abar_t / abar_prev` and its log-variance interpolated between them and the posterior variance must be what
    diffusers' `DDPMScheduler` computes from the previous kept timestep. Both sides consume the same per-step noise
    (the original draws with `torch.randn_like` in `p_sample`, also at the last step where it is masked out;
    diffusers with `randn_tensor` at every step but the last).

    The pipeline runs as shipped: its DDPM schedule in float64 like the original's (`float64_schedule=True`); in
    float32, as diffusers keeps it, 1 - abar_0 = 4.1e-5 loses digits and stage I's last step moves by ~2.2e-4."""
    pipe, original = _pipeline(stage, converted, pipeline_components, "ddpm")
    size = pipe.unet.config.sample_size
    diffusion = _original_diffusion(DDPM_RESPACING)
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randn(len(PROMPTS), 3, size, size, generator=generator) for _ in diffusion.timestep_map[1:]]
    ours_noise, original_noise = _NoiseQueue(steps), _NoiseQueue([*steps, torch.zeros_like(steps[0])])
    with monkeypatch.context() as patch:
        # our loop steps DDPM with `SyncFreeDDPMStep`, which draws where diffusers' step does
        patch.setattr(if_diffusers.scheduling, "randn_tensor", lambda shape, **kwargs: ours_noise.draw(shape))
        ours = _run_ours(pipe, stage, embeddings, timesteps=DDPM_RESPACING)
    with monkeypatch.context() as patch:
        patch.setattr(gaussian_diffusion.torch, "randn_like", lambda x: original_noise.draw(x.shape))
        expected = _run_original(original, stage, diffusion.p_sample_loop, size, embeddings)
    assert ours_noise.used == len(steps) and original_noise.used == len(steps) + 1
    assert pipe.scheduler.timesteps.tolist() == sorted(diffusion.timestep_map, reverse=True)
    assert ours.shape == expected.shape == (len(PROMPTS), 3, size, size)
    error = (ours - expected).abs().max().item()
    assert error < TOLERANCE, f"max abs error {error:.3g}"
