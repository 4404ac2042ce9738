"""Schedulers, timesteps, the denoising loop's host synchronisation, attention processors and the progress bar.

* Every diffusers scheduler that fits a pixel-space model runs when swapped in with
  `Cls.from_config(pipe.scheduler.config)`, at stage I and in super-resolution, for an epsilon or a v-prediction UNet
  (the demo's stage II), also from an image (img2img), and gets the learned variance only where it reads it
  (diffusers' IF pipelines crash with DDIM, UniPC, Euler, ..., and DPM-Solver crashes on a v model's 6 channels).
* `timesteps=` presets expand exactly as the original `deepfloyd_if` expands them; bad values raise `ValueError`.
* `_denoise` never reads a tensor back to the host: a full generation runs while every host read raises, with a
  pure-tensor scheduler and with IF's DDPM (stepped by `SyncFreeDDPMStep`, bit-identical to diffusers' step).
* Attention slicing on and off comes back to the SDPA processors, with the same images.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
from pathlib import Path

import diffusers
import pytest
import torch
from deepfloyd_if.model.respace import space_timesteps as original_space_timesteps
from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    SlicedAttnAddedKVProcessor,
)

import if_diffusers
from if_diffusers.scheduling import (
    SyncFreeDDPMStep,
    denoising_scheduler,
    set_schedule_precision,
    takes_learned_variance,
)

PROMPT = "a red circle on a blue background"
STEPS = 4
LOW_RES = 8  # stage II input; the stage II UNet works at 32x32

# Scheduler -> inference steps for the stage-I / super-resolution runs. The ancestral ones need more: on IF's cosine
# schedule sigma_max is 2e4, and with few steps diffusers' float32 `sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5`
# cancels to a negative number (EulerAncestral at 4 steps) or its interpolated timesteps come out NaN
# (KDPM2Ancestral: at 10 steps, on some machines, its first `sigma_down` cancels to exactly 0, whose log makes the
# interpolated sigma NaN; 16 steps leave it room): a diffusers precision issue on any pipeline, not one of ours.
SCHEDULERS = {
    "DDPMScheduler": STEPS,
    "DDIMScheduler": STEPS,
    "DPMSolverMultistepScheduler": STEPS,
    "DPMSolverSinglestepScheduler": STEPS,
    "DPMSolverSDEScheduler": STEPS,
    "UniPCMultistepScheduler": STEPS,
    "DEISMultistepScheduler": STEPS,
    "EulerDiscreteScheduler": STEPS,
    "EulerAncestralDiscreteScheduler": 3,
    "HeunDiscreteScheduler": STEPS,
    "KDPM2DiscreteScheduler": STEPS,
    "KDPM2AncestralDiscreteScheduler": 16,
    "LMSDiscreteScheduler": STEPS,
    "PNDMScheduler": STEPS,
}
# Read from diffusers' step code: DDPM turns the variance channels into its step variance ("learned_range"), and
# only it gets them. DPM-Solver (both) slices them off itself, but for an epsilon model only.
READS_LEARNED_VARIANCE = {"DDPMScheduler"}
SLICES_VARIANCE_FOR_EPSILON = {"DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"}
# Those whose `set_timesteps` takes `timesteps=` (the others must refuse a list or a preset).
TAKE_CUSTOM_TIMESTEPS = {"DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                         "EulerDiscreteScheduler", "HeunDiscreteScheduler"}  # fmt: skip


def _scheduler(name: str, config, **overrides):
    if name == "DPMSolverSDEScheduler":  # its Brownian tree is seeded from the global RNG unless given a seed
        overrides.setdefault("noise_sampler_seed", 0)
    return getattr(diffusers, name).from_config(config, **overrides)


def _pipeline(pipeline_components, name: str = "IFPipeline", scheduler: str | None = None, **overrides):
    stage = "II" if "SuperResolution" in name else "I"
    pipe = getattr(if_diffusers, name)(**pipeline_components(stage))
    if scheduler is not None:
        pipe.scheduler = _scheduler(scheduler, pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_twin(pipeline_components, scheduler: str, **overrides) -> diffusers.IFPipeline:
    """diffusers' own stage-I `IFPipeline` on the same components, with `scheduler` swapped in as for ours."""
    theirs = diffusers.IFPipeline(**pipeline_components("I"))
    theirs.scheduler = _scheduler(scheduler, theirs.scheduler.config, **overrides)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def _image(seed: int, size: int) -> torch.Tensor:
    """`(1, 3, size, size)` in `[-0.9, 0.9]` (inside dynamic thresholding's range, so thresholding keeps it)."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


def _inputs(name: str) -> dict:
    return {
        "IFPipeline": {},
        "IFSuperResolutionPipeline": {"image": _image(1, LOW_RES)},
        "IFImg2ImgPipeline": {"image": _image(2, 16), "strength": 0.5},
        "IFImg2ImgSuperResolutionPipeline": {"image": _image(1, LOW_RES), "original_image": _image(3, 32),
                                             "strength": 0.5},
        "IFInpaintingPipeline": {"image": _image(5, 16), "mask_image": (_image(6, 16)[:, :1] > 0).float(),
                                 "strength": 0.5},
    }[name]  # fmt: skip


def _run(pipe, name: str, steps: int = STEPS, **call) -> tuple[torch.Tensor, list[float]]:
    """Generate with seed 0; returns the `pt` images and the timesteps the loop ran (from `callback_on_step_end`)."""
    ran = []

    def record(pipeline, step, t, tensors):
        ran.append(float(t))
        return tensors

    call = {**_inputs(name), "num_inference_steps": steps, **call}
    images = pipe(prompt=PROMPT, output_type="pt", generator=torch.Generator().manual_seed(0),
                  callback_on_step_end=record, **call).images  # fmt: skip
    return images, ran


def _spy_step_channels(pipe) -> list[int]:
    """Record the channel count of every `model_output` the scheduler's `step` receives (replaced on the instance,
    DDPM's `step` is called as it is, not stood in for by `SyncFreeDDPMStep`)."""
    channels, step = [], pipe.scheduler.step

    def spy(model_output, *args, **kwargs):
        channels.append(model_output.shape[1])
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = spy
    return channels


def _skip_unet(pipe, monkeypatch) -> None:
    """Replace the UNet's computation with zeros `(N, 6, H, W)` where only the timesteps matter (the pipeline, its
    scheduler and loop still run in full)."""

    def zeros(sample, *args, **kwargs):
        return (torch.zeros(sample.shape[0], 6, *sample.shape[2:], dtype=sample.dtype),)

    monkeypatch.setattr(pipe.unet, "forward", zeros)


def _count_model_calls(pipe, monkeypatch) -> list[str]:
    """Record a name each time the text encoder or the UNet runs."""
    calls = []
    for name in ("text_encoder", "unet"):
        module = getattr(pipe, name)
        monkeypatch.setattr(
            module, "forward", lambda *a, _f=module.forward, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    return calls


# --- every scheduler runs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_scheduler_from_config_runs(pipeline_components, name, scheduler, prediction_type):
    """`Cls.from_config(IF's DDPM config)` (thresholding, clip_sample and a `variance_type` most schedulers do not
    know, all carried over) gives finite images of the right size, and `step` gets 6 channels only where it reads
    them. diffusers' IF pipelines pass 6 channels whenever the config names a learned variance, inherited or not,
    and crash in DDIM, UniPC, Euler, ..., and in DPM-Solver with a v-prediction UNet."""
    pipe = _pipeline(pipeline_components, name, scheduler, prediction_type=prediction_type)
    channels = _spy_step_channels(pipe)
    images, ran = _run(pipe, name, SCHEDULERS[scheduler])
    size = 16 if name == "IFPipeline" else 32
    assert images.shape == (1, 3, size, size)
    assert torch.isfinite(images).all()
    assert len(ran) == len(pipe.scheduler.timesteps) == len(channels) > 0
    assert set(channels) == {6 if scheduler in READS_LEARNED_VARIANCE else 3}


@pytest.mark.parametrize(
    "scheduler, prediction_type",
    [("DDIMScheduler", "epsilon"), ("UniPCMultistepScheduler", "epsilon"), ("EulerDiscreteScheduler", "epsilon")]
    + [(name, "v_prediction") for name in sorted(SLICES_VARIANCE_FOR_EPSILON)],
)
def test_diffusers_twin_crashes_where_ours_runs(pipeline_components, scheduler, prediction_type):
    """The cases above are real defects: diffusers' own `IFPipeline` fails on them (6 channels to a scheduler that
    computes with 3; DPM-Solver slices them off for epsilon only, not for a v model), so the test above exercises
    what it claims to."""
    theirs = _diffusers_twin(pipeline_components, scheduler, prediction_type=prediction_type)
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs(prompt=PROMPT, num_inference_steps=2, output_type="pt")


@pytest.mark.parametrize("scheduler", sorted(READS_LEARNED_VARIANCE | SLICES_VARIANCE_FOR_EPSILON))
def test_learned_variance_used_only_where_read(pipeline_components, monkeypatch, scheduler):
    """Shifting the variance channels changes DDPM's images (it samples with the learned variance) and leaves
    DPM-Solver's bit-identical (the noise channels alone reach it)."""
    pipe = _pipeline(pipeline_components, "IFPipeline", scheduler)
    baseline, _ = _run(pipe, "IFPipeline", SCHEDULERS[scheduler])
    forward = pipe.unet.forward

    def shifted_variance(*args, **kwargs):
        output = forward(*args, **kwargs)[0]  # (2B, 6, H, W): noise, then variance interpolation
        return (torch.cat([output[:, :3], output[:, 3:] + 0.5], dim=1),)

    monkeypatch.setattr(pipe.unet, "forward", shifted_variance)
    pipe.scheduler = _scheduler(scheduler, pipe.scheduler.config)
    shifted, _ = _run(pipe, "IFPipeline", SCHEDULERS[scheduler])
    assert torch.equal(baseline, shifted) is (scheduler not in READS_LEARNED_VARIANCE)


@pytest.mark.parametrize("scheduler", sorted(SLICES_VARIANCE_FOR_EPSILON))
def test_dpm_solver_images_match_diffusers_for_epsilon(pipeline_components, scheduler):
    """For an epsilon UNet, giving DPM-Solver the noise channels instead of all 6 (as diffusers' `IFPipeline` does,
    letting DPM-Solver slice them) changes nothing: the same images as diffusers' pipeline from the same weights."""
    ours = _pipeline(pipeline_components, "IFPipeline", scheduler)
    theirs = _diffusers_twin(pipeline_components, scheduler)
    channels = _spy_step_channels(theirs)
    call = {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "pt"}
    expected = theirs(generator=torch.Generator().manual_seed(0), **call).images
    assert set(channels) == {6}
    images = ours(generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_takes_learned_variance_follows_the_schedulers_own_config():
    """6 channels go only to a scheduler that samples with a learned variance: not to DDPM with a fixed variance,
    nor to DPM-Solver (which would drop them for epsilon and fail for v), nor to DDIM that merely inherited the
    key."""
    learned = {"variance_type": "learned_range"}
    assert takes_learned_variance(DDPMScheduler(**learned))
    assert takes_learned_variance(DDPMScheduler(variance_type="learned"))
    assert not takes_learned_variance(DDPMScheduler(variance_type="fixed_small"))
    assert takes_learned_variance(diffusers.DDPMParallelScheduler(**learned))
    assert not takes_learned_variance(diffusers.DPMSolverMultistepScheduler(**learned))
    assert not takes_learned_variance(diffusers.SASolverScheduler(**learned))
    ddim = diffusers.DDIMScheduler.from_config(DDPMScheduler(**learned).config)
    assert ddim.config.get("variance_type") == "learned_range" and not takes_learned_variance(ddim)


# --- img2img: strength with multistep and second-order schedulers --------------------------------------------------


IMG2IMG_SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                      "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                      "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "LMSDiscreteScheduler"]  # fmt: skip


@pytest.mark.parametrize("name", ["IFImg2ImgPipeline", "IFImg2ImgSuperResolutionPipeline"])
@pytest.mark.parametrize("scheduler", IMG2IMG_SCHEDULERS)
def test_img2img_runs_the_last_steps_of_the_schedule(pipeline_components, monkeypatch, name, scheduler):
    """At strength 0.5 of 4 steps, img2img runs the last 2 steps of the text-to-image schedule: for a second-order
    scheduler (Heun, KDPM2, DPM-Solver SDE: `order` 2) a step is 2 UNet calls after the first, so Heun's
    `[999, 666, 666, 333, 333, 0, 0]` becomes `[333, 0, 0]`. Then with the real UNet: finite images."""
    pipe = _pipeline(pipeline_components, name, scheduler)
    with monkeypatch.context() as patch:
        _skip_unet(pipe, patch)
        _, full = _run(pipe, name, strength=1.0)
    images, ran = _run(pipe, name, strength=0.5)
    order = pipe.scheduler.order
    kept_steps = int(STEPS * 0.5)
    assert ran == full[len(full) - (order * kept_steps - (order - 1)) :]
    assert images.shape == _inputs(name).get("original_image", _inputs(name)["image"]).shape
    assert torch.isfinite(images).all()


def _oracle_img2img(pipe, monkeypatch, image: torch.Tensor, strength: float, steps: int) -> torch.Tensor:
    """img2img with a UNet that always predicts the very noise the image was noised with. A deterministic scheduler
    then returns the image exactly, but only if every step's timestep is the noise level the sample is at: a start
    index off by one step, or a sigma schedule started elsewhere (`set_begin_index`), leaves noise behind."""
    noise_of = {}
    add_noise = pipe.scheduler.add_noise

    def recording_add_noise(original, noise, timesteps):
        noise_of["start"] = noise
        return add_noise(original, noise, timesteps)

    def oracle(sample, timestep, *args, **kwargs):
        noise = noise_of["start"].repeat(sample.shape[0] // noise_of["start"].shape[0], 1, 1, 1)
        return (torch.cat([noise, torch.zeros_like(noise)], dim=1),)  # (B, 6, H, W): noise, variance

    monkeypatch.setattr(pipe.scheduler, "add_noise", recording_add_noise)
    monkeypatch.setattr(pipe.unet, "forward", oracle)
    return pipe(prompt=PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=1.0,
                output_type="pt").images  # fmt: skip


# Deterministic schedulers that end at sigma 0 (DEIS and PNDM end at t = 0's noise level, 0.006 * noise, by design).
ORACLE_SCHEDULERS = ["DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                     "UniPCMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                     "KDPM2DiscreteScheduler"]  # fmt: skip


@pytest.mark.parametrize("scheduler", ORACLE_SCHEDULERS + ["LMSDiscreteScheduler"])
@pytest.mark.parametrize("strength, steps", [(0.5, 4), (0.75, 4), (0.6, 5)])
def test_img2img_steps_match_the_noise_level(pipeline_components, monkeypatch, scheduler, strength, steps):
    """With a perfect noise predictor img2img gives back its input image (float32 round-off only). LMS passes only
    because our loop caps its order by the derivatives it holds: diffusers' `step` takes min(step_index + 1, 4) and
    is off by 0.47 at strength 0.5 here."""
    pipe = _pipeline(pipeline_components, "IFImg2ImgPipeline", scheduler)
    image = _image(4, 16)
    assert (_oracle_img2img(pipe, monkeypatch, image, strength, steps) - image).abs().max() < 1e-4


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_refuses_to_start_inside_its_schedule(pipeline_components, monkeypatch, skip_prk_steps):
    """PNDM's warm-up is laid out for the start of its schedule (its Runge-Kutta steps even ignore the timestep
    given), so img2img with it would denoise at the wrong noise levels: a ValueError before the UNet runs; strength
    1 (inpainting's default) still works."""
    pipe = _pipeline(pipeline_components, "IFImg2ImgPipeline", "PNDMScheduler", skip_prk_steps=skip_prk_steps)
    calls = _count_model_calls(pipe, monkeypatch)
    with pytest.raises(ValueError, match=r"strength=0\.5 .*PNDMScheduler"):
        _run(pipe, "IFImg2ImgPipeline", strength=0.5)
    assert "unet" not in calls
    images, _ = _run(pipe, "IFImg2ImgPipeline", strength=1.0)
    assert torch.isfinite(images).all()


# --- timesteps: custom lists and the original's presets --------------------------------------------------------------


@pytest.mark.parametrize("scheduler", sorted(TAKE_CUSTOM_TIMESTEPS))
def test_custom_timesteps_are_run(pipeline_components, monkeypatch, scheduler):
    """A list goes to the scheduler as given; a second-order scheduler evaluates each step after the first twice."""
    pipe = _pipeline(pipeline_components, "IFPipeline", scheduler)
    _skip_unet(pipe, monkeypatch)
    custom = [999, 700, 400, 100]
    _, ran = _run(pipe, "IFPipeline", timesteps=custom)
    expected = custom if pipe.scheduler.order == 1 else [999, 700, 700, 400, 400, 100, 100]
    assert ran == expected


@pytest.mark.parametrize("scheduler", sorted(set(SCHEDULERS) - TAKE_CUSTOM_TIMESTEPS))
@pytest.mark.parametrize("timesteps", [[999, 500, 0], "smart27"])
def test_custom_timesteps_refused_by_schedulers_without_them(pipeline_components, monkeypatch, scheduler, timesteps):
    """A list or preset with a scheduler whose `set_timesteps` takes none: a ValueError naming both, before any
    model runs, instead of diffusers' TypeError (or a silently ignored list)."""
    pipe = _pipeline(pipeline_components, "IFPipeline", scheduler)
    calls = _count_model_calls(pipe, monkeypatch)
    with pytest.raises(ValueError, match=rf"timesteps=.*{scheduler} cannot take custom timesteps"):
        _run(pipe, "IFPipeline", timesteps=timesteps)
    assert calls == []


def _original_respacing_modes() -> dict[str, str]:
    """`IFBaseModule.respacing_modes`, read from the source of `deepfloyd_if/modules/base.py` (importing it needs
    torchvision and downloads CLIP)."""
    source = Path(importlib.util.find_spec("deepfloyd_if").origin).parent / "modules" / "base.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "IFBaseModule":
            for statement in node.body:
                if isinstance(statement, ast.Assign) and [t.id for t in statement.targets] == ["respacing_modes"]:
                    return ast.literal_eval(statement.value)
    raise AssertionError(f"IFBaseModule.respacing_modes not found in {source}")


ORIGINAL_PRESETS = _original_respacing_modes()


def test_presets_are_the_originals():
    """The same preset names as the original: none missing, none invented."""
    assert set(ORIGINAL_PRESETS) == set(if_diffusers.timesteps.RESPACING_PRESETS)
    assert {"fast27", "smart27", "smart50", "smart100", "smart185", "super27", "super40", "super100"} <= set(
        ORIGINAL_PRESETS
    )


@pytest.mark.parametrize("preset", sorted(ORIGINAL_PRESETS))
def test_preset_runs_the_originals_timesteps(pipeline_components, monkeypatch, preset):
    """`timesteps=preset` runs exactly the steps of `space_timesteps(1000, the original's string)`, the original's
    `get_diffusion(preset)` (which maps the name to its string first, so "fast27" keeps step 999). super40 caught
    a rounding difference (950 for the original's 949)."""
    name = "IFSuperResolutionPipeline" if preset.startswith("super") else "IFPipeline"
    pipe = _pipeline(pipeline_components, name)
    _skip_unet(pipe, monkeypatch)
    _, ran = _run(pipe, name, timesteps=preset)
    expected = sorted(original_space_timesteps(1000, ORIGINAL_PRESETS[preset]), reverse=True)
    assert ran == expected
    assert pipe.scheduler.timesteps.tolist() == expected


@pytest.mark.parametrize("sections", ["10,10,3,2,2", "3,0,7", "ddim25", "5,50,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,40"])
def test_section_strings_expand_as_the_original(sections):
    """Any section string or "ddimN" the original accepts expands to the same steps."""
    expected = sorted(original_space_timesteps(1000, sections), reverse=True)
    assert if_diffusers.timesteps.resolve_timesteps(sections, 1000) == expected


@pytest.mark.parametrize(
    "timesteps, message",
    [
        ("smart40", r"'smart40' is not a preset: expected one of \['fast27', 'smart100', 'smart185', 'smart27', "
                    r"'smart50', 'super100', 'super27', 'super40'\]"),
        ([100, 500, 999], r"expected distinct integers in \[0, 1000\) in descending order"),
        ([999, 500, 500, 0], r"expected distinct integers"),
        ([1000, 500], r"expected distinct integers in \[0, 1000\)"),
        ([500, -1], r"expected distinct integers in \[0, 1000\)"),
        ([], r"expected distinct integers"),
        ([999.5, 500], r"list of integers"),
        (50, r"for a number of steps, use num_inference_steps"),
        ("0,0", r"keeps no step"),
        ("2000", r"cannot take 2000 steps"),
    ],
)  # fmt: skip
def test_bad_timesteps_raise(pipeline_components, monkeypatch, timesteps, message):
    """Unknown presets, unordered, repeated, out-of-range or non-integer steps: a ValueError naming `timesteps`,
    before any model runs."""
    pipe = _pipeline(pipeline_components, "IFPipeline")
    calls = _count_model_calls(pipe, monkeypatch)
    with pytest.raises(ValueError, match=rf"^timesteps=.*{message}"):
        _run(pipe, "IFPipeline", timesteps=timesteps)
    assert calls == []


# --- no host synchronisation in the denoising loop ----------------------------------------------------------------


class HostSyncError(AssertionError):
    pass


# Every way Python code reads a tensor's value back to the host (on a GPU each waits for the queued kernels).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__")


@contextlib.contextmanager
def _host_reads_raise(monkeypatch):
    with monkeypatch.context() as patch:
        for method in HOST_READS:

            def refuse(self, *args, _method=method, **kwargs):
                raise HostSyncError(f"Tensor.{_method} called inside the denoising loop")

            patch.setattr(torch.Tensor, method, refuse)
        yield


class PureTensorScheduler(SchedulerMixin, ConfigMixin):
    """DDIM (eta 0, x0 clipped to [-1, 1]) written with tensor operations only, unlike diffusers' schedulers, which
    read the timestep on the host (DDPM's `previous_timestep` and `if t > 0`, DPM-Solver's `.item()` ...)."""

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        self.alphas_cumprod = DDPMScheduler(num_train_timesteps, beta_schedule="squaredcos_cap_v2").alphas_cumprod
        self.timesteps = torch.arange(num_train_timesteps).flip(0)
        self.stride = 1

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.stride = self.config.num_train_timesteps // num_inference_steps
        self.timesteps = (torch.arange(num_inference_steps).flip(0) * self.stride).to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _alpha_bar(self, timestep: torch.Tensor) -> torch.Tensor:
        """`(N, 1, 1, 1)` alpha-bar at integer `timestep`s; 1 below step 0."""
        index = timestep.reshape(-1).long()
        alpha_bar = self.alphas_cumprod.gather(0, index.clamp(min=0))
        return torch.where(index >= 0, alpha_bar, torch.ones_like(alpha_bar)).view(-1, 1, 1, 1)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        alpha_bar, alpha_bar_prev = self._alpha_bar(timestep), self._alpha_bar(timestep - self.stride)
        x0 = ((sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5).clamp(-1, 1)
        return (alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * model_output,)

    def add_noise(self, original, noise, timesteps):
        alpha_bar = self._alpha_bar(timesteps)
        return alpha_bar**0.5 * original + (1 - alpha_bar) ** 0.5 * noise


class BranchingScheduler(PureTensorScheduler):
    """The same with one Python branch on a tensor, as diffusers' DDPM has (`if t > 0:`)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if timestep > 0:
            pass
        return super().step(model_output, timestep, sample, generator, return_dict)


def _guard_denoise(pipe, monkeypatch) -> list[int]:
    """Make every host read raise while `_denoise` runs (the rest of the pipeline may read); returns a list that
    gets one entry per guarded loop."""
    denoise, loops = pipe._denoise, []

    def guarded(*args, **kwargs):
        with _host_reads_raise(monkeypatch):
            images = denoise(*args, **kwargs)
        loops.append(1)
        return images

    monkeypatch.setattr(pipe, "_denoise", guarded)
    return loops


SYNC_CASES = [
    ("IFPipeline", {"positive_prompt": "a small green square", "style_prompt": "the words hello world"}),
    ("IFSuperResolutionPipeline", {"redraw_augmentation_noise": True}),
    ("IFInpaintingPipeline", {}),
]


@pytest.mark.parametrize("name, call", SYNC_CASES, ids=[case[0] for case in SYNC_CASES])
def test_denoise_loop_never_reads_tensors_on_the_host(pipeline_components, monkeypatch, name, call):
    """A full generation (guidance with positive and style prompts, redrawn augmentation, inpainting blend, legacy
    and new callbacks) with our UNets and a sync-free scheduler: no host read in `_denoise`."""
    stage = "II" if "SuperResolution" in name else "I"
    pipe = getattr(if_diffusers, name)(**{**pipeline_components(stage), "scheduler": PureTensorScheduler()})
    pipe.set_progress_bar_config(disable=True)
    loops = _guard_denoise(pipe, monkeypatch)
    call = {**_inputs(name), **call}
    with pytest.warns(FutureWarning):  # the deprecated `callback` still runs, without syncing
        images = pipe(prompt=PROMPT, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0),
                      callback_on_step_end=lambda p, i, t, tensors: tensors, callback=lambda i, t, x: None,
                      **call).images  # fmt: skip
    assert loops == [1]
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline", "IFImg2ImgPipeline"])
def test_ddpm_loop_never_reads_tensors_on_the_host(pipeline_components, monkeypatch, name):
    """IF's own scheduler (DDPM, learned variance, dynamic thresholding): its steps go through `SyncFreeDDPMStep`,
    with no host read from the first step to the last (diffusers' `DDPMScheduler.step` makes 11 per step)."""
    stage = "II" if "SuperResolution" in name else "I"
    pipe = getattr(if_diffusers, name)(**pipeline_components(stage))
    assert type(pipe.scheduler) is DDPMScheduler
    pipe.set_progress_bar_config(disable=True)
    loops = _guard_denoise(pipe, monkeypatch)
    images = pipe(prompt=PROMPT, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0),
                  **_inputs(name)).images  # fmt: skip
    assert loops == [1] and torch.isfinite(images).all()


DDPM_CONFIGS = {
    "stage_I": denoising_scheduler("I").config,
    "stage_II_v_prediction": denoising_scheduler("II", "v_prediction").config,
    "default_fixed_small_clipped": DDPMScheduler(beta_schedule="squaredcos_cap_v2").config,
    "sample_prediction": DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample").config,
}


@pytest.mark.parametrize("config", DDPM_CONFIGS)
@pytest.mark.parametrize("float64", [True, False], ids=["float64_schedule", "float32_schedule"])
@pytest.mark.parametrize("timesteps, start", [(None, 0), ([999, 800, 420, 90, 3, 0], 0), ([990, 500, 7], 0),
                                              (None, 3)],
                         ids=["5_steps", "custom", "custom_not_to_0", "from_step_3"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sync_free_ddpm_step_equals_diffusers_step_bit_for_bit(config, float64, timesteps, start, dtype):
    scheduler = DDPMScheduler.from_config(DDPM_CONFIGS[config])
    set_schedule_precision(scheduler, float64)
    if timesteps is None:
        scheduler.set_timesteps(5)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    sync_free = SyncFreeDDPMStep(scheduler, start)
    channels = 6 if scheduler.config.variance_type == "learned_range" else 3
    sample = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.5).to(dtype)
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for index, t in enumerate(scheduler.timesteps[start:]):
        output = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(10 + index)).to(dtype)
        expected = scheduler.step(output, t, sample, generator=theirs).prev_sample
        stepped = sync_free.step(index, output, sample, ours)
        # exact, NaN where diffusers' is NaN (float16 overflows at t=999 with the learned variance)
        torch.testing.assert_close(stepped, expected, rtol=0, atol=0, equal_nan=True, msg=f"step {index}, t={int(t)}")
        sample = expected
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_sync_free_ddpm_step_is_for_what_it_knows_and_refuses_what_diffusers_refuses():
    scheduler = denoising_scheduler("I")
    assert SyncFreeDDPMStep.applies_to(scheduler)
    assert not SyncFreeDDPMStep.applies_to(DDPMScheduler(variance_type="fixed_large"))
    assert not SyncFreeDDPMStep.applies_to(diffusers.DDIMScheduler())
    scheduler.set_timesteps(3)
    step = SyncFreeDDPMStep(scheduler, 0)
    with pytest.raises(ValueError, match="model_output has 3 channels; a learned_range DDPM step needs"):
        step.step(0, torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    scheduler.step = scheduler.step  # replaced on the instance (a spy, a patch): that `step` runs, as it is
    assert not SyncFreeDDPMStep.applies_to(scheduler)
    odd = DDPMScheduler(prediction_type="x0")
    odd.set_timesteps(2)
    with pytest.raises(ValueError, match="prediction_type='x0': expected 'epsilon', 'v_prediction' or 'sample'"):
        SyncFreeDDPMStep(odd, 0).step(0, torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_host_read_guard_catches_a_branch_on_a_tensor(pipeline_components, monkeypatch):
    """The guard is live: one `if tensor:` in the scheduler's step fails the generation."""
    pipe = if_diffusers.IFPipeline(**{**pipeline_components("I"), "scheduler": BranchingScheduler()})
    pipe.set_progress_bar_config(disable=True)
    _guard_denoise(pipe, monkeypatch)
    with pytest.raises(HostSyncError, match="__bool__"):
        pipe(prompt=PROMPT, num_inference_steps=2, output_type="pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CPU has no device to wait for")
def test_denoise_loop_does_not_synchronise_cuda(pipeline_components, monkeypatch):
    """On a GPU, CUDA's own sync detector (which also sees syncs made inside PyTorch's C++, e.g. by nonzero or
    boolean indexing) stays silent from the loop's first UNet call to its end: no sync per step (one-off setup
    before the loop, such as moving a schedule to the device, may sync once)."""
    pipe = if_diffusers.IFSuperResolutionPipeline(**{**pipeline_components("II"), "scheduler": PureTensorScheduler()})
    pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    denoise, forward = pipe._denoise, pipe.unet.forward

    def detect_from_first_call(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        return forward(*args, **kwargs)

    def guarded(*args, **kwargs):
        try:
            return denoise(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(pipe.unet, "forward", detect_from_first_call)
    monkeypatch.setattr(pipe, "_denoise", guarded)
    generator = torch.Generator("cuda").manual_seed(0)
    try:
        images = pipe(prompt=PROMPT, image=_image(1, LOW_RES).cuda(), num_inference_steps=3, output_type="pt",
                      generator=generator, positive_prompt="a small green square",
                      redraw_augmentation_noise=True).images  # fmt: skip
    finally:
        pipe.to("cpu")  # the components are shared with the other tests
    assert torch.isfinite(images).all()


# --- attention processors ------------------------------------------------------------------------------------------


def _processors(unet) -> set[type]:
    return {type(processor) for processor in unet.attn_processors.values()}


def _stock_unet(unet) -> UNet2DConditionModel:
    """diffusers' own class with the same weights (what `from_pretrained` of DeepFloyd's hub repos loads)."""
    stock = UNet2DConditionModel.from_config(unet.config)
    stock.load_state_dict(unet.state_dict())
    return stock.eval()


@pytest.mark.parametrize("unet_class", ["ours", "stock"])
def test_attention_slicing_off_restores_sdpa(pipeline_components, unet_class):
    """SDPA processors by default; slicing on gives sliced ones with the same images; slicing off gives SDPA back
    (diffusers gives the plain `AttnAddedKVProcessor`), again with the same images, for our UNet class and through
    the pipeline for diffusers' stock class."""
    components = pipeline_components("I")
    if unet_class == "stock":
        components["unet"] = _stock_unet(components["unet"])
    pipe = if_diffusers.IFPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert _processors(pipe.unet) == {AttnAddedKVProcessor2_0}
    reference, _ = _run(pipe, "IFPipeline", steps=2)

    pipe.enable_attention_slicing()
    assert _processors(pipe.unet) == {SlicedAttnAddedKVProcessor}
    sliced, _ = _run(pipe, "IFPipeline", steps=2)
    assert (sliced - reference).abs().max() < 1e-5

    pipe.disable_attention_slicing()
    assert _processors(pipe.unet) == {AttnAddedKVProcessor2_0}
    unsliced, _ = _run(pipe, "IFPipeline", steps=2)
    assert (unsliced - reference).abs().max() < 1e-5


def test_stock_unet_alone_falls_back_to_plain_attention(pipeline_components):
    """Why the pipeline needs its override: diffusers' `set_attention_slice(None)` on its own UNet class leaves the
    plain processor; on our UNet classes the same call restores SDPA."""
    ours = pipeline_components("I")["unet"]
    stock = _stock_unet(ours)
    stock.set_attention_slice(None)
    assert _processors(stock) == {AttnAddedKVProcessor}
    ours.set_attention_slice(None)
    assert _processors(ours) == {AttnAddedKVProcessor2_0}


def test_partial_slicing_keeps_sdpa_on_unsliced_layers(pipeline_components):
    """A per-layer list: sliced layers get the sliced processor, `None` layers SDPA."""
    unet = pipeline_components("I")["unet"]
    layers = len(unet.attn_processors)
    try:
        unet.set_attention_slice([None, 2] * (layers // 2))
        kinds = [type(module.processor) for module in unet.modules() if isinstance(module, Attention)]
        assert kinds == [AttnAddedKVProcessor2_0, SlicedAttnAddedKVProcessor] * (layers // 2)
    finally:
        unet.set_attention_slice(None)
    assert _processors(unet) == {AttnAddedKVProcessor2_0}


def test_set_default_attn_processor_keeps_diffusers_meaning(pipeline_components):
    """`set_default_attn_processor()` is diffusers' request for the reference (non-SDPA) `AttnAddedKVProcessor`,
    kept as is: same outputs as SDPA, and `set_attention_slice(None)` returns to SDPA."""
    unet = pipeline_components("I")["unet"]
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 5, 24, generator=generator)
    timesteps = torch.tensor([10, 900])
    try:
        with torch.no_grad():
            sdpa = unet(sample, timesteps, text).sample
            unet.set_default_attn_processor()
            assert _processors(unet) == {AttnAddedKVProcessor}
            plain = unet(sample, timesteps, text).sample
        assert (plain - sdpa).abs().max() < 1e-5
    finally:
        unet.set_attention_slice(None)
    assert _processors(unet) == {AttnAddedKVProcessor2_0}


# --- progress bar ----------------------------------------------------------------------------------------------------


def test_progress_bar_counts_unet_calls_and_can_be_disabled(pipeline_components, monkeypatch):
    """The bar's total is the number of UNet calls (7 for Heun's 4 steps); `disable=True` prints nothing."""
    pipe = _pipeline(pipeline_components, "IFPipeline", "HeunDiscreteScheduler")
    _skip_unet(pipe, monkeypatch)
    shown = io.StringIO()
    pipe.set_progress_bar_config(file=shown, disable=False)
    _run(pipe, "IFPipeline")
    assert "7/7" in shown.getvalue()
    hidden = io.StringIO()
    pipe.set_progress_bar_config(file=hidden, disable=True)
    _run(pipe, "IFPipeline")
    assert hidden.getvalue() == ""
