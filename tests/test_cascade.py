"""IFCascadePipeline: the three modes end to end with and without stage III, equal to the stage pipelines chained by
hand; intermediates; safety checker and watermark on every returned stage; save/load; from_pretrained_stages sharing
one T5; and bad input rejected before any model runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import STAGE_II_CONFIGS
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionUpscalePipeline
from diffusers.pipelines.deepfloyd_if import IFSafetyChecker, IFWatermarker
from transformers import CLIPConfig, CLIPImageProcessor, T5EncoderModel

from if_diffusers import (
    IFCascadePipeline,
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    IFInpaintingPipeline,
    IFInpaintingSuperResolutionPipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
    IFSuperResUNet2DConditionModel,
    IFUNet2DConditionModel,
)
from if_diffusers.pipelines.cascade_inputs import resize

PROMPTS = ["a red circle", "a green square"]
STEPS = dict(stage_1_num_inference_steps=2, stage_2_num_inference_steps=2, stage_3_num_inference_steps=2)


def _stages(pipeline_components, tiny_upscaler, with_stage_3: bool = True):
    stage_1 = IFPipeline(**pipeline_components("I"))
    stage_2 = IFSuperResolutionPipeline(**pipeline_components("II"))
    stage_3 = StableDiffusionUpscalePipeline(**tiny_upscaler) if with_stage_3 else None
    for stage in (stage_1, stage_2, stage_3):
        if stage is not None:
            stage.set_progress_bar_config(disable=True)
    return stage_1, stage_2, stage_3


@pytest.fixture
def cascade(pipeline_components, tiny_upscaler):
    def build(with_stage_3: bool = True) -> IFCascadePipeline:
        pipeline = IFCascadePipeline.from_stages(*_stages(pipeline_components, tiny_upscaler, with_stage_3))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    return build


def _source(size=(64, 48), batch=2, seed=0):
    """A smooth source image batch in [-1, 1] (portrait: stage I 16 wide -> 22 tall -> rounded to 22)."""
    generator = torch.Generator().manual_seed(seed)
    return (
        (torch.rand(batch, 3, size[0] // 8, size[1] // 8, generator=generator) * 2 - 1)
        .repeat_interleave(8, -1)
        .repeat_interleave(8, -2)
    )


def _mask(size=(64, 48)):
    mask = torch.zeros(1, 1, *size)
    mask[..., : size[0] // 2, :] = 1  # repaint the top half
    return mask


def _by_hand(stages, mode, generator, source=None, mask=None, sizes=None, with_stage_3=True):
    """The cascade's chain run with the stage pipelines: text prompts, the original's defaults of `mode`."""
    stage_1, stage_2, stage_3 = stages
    common = dict(prompt=PROMPTS, generator=generator, output_type="pt", num_inference_steps=2)
    if mode == "text2img":
        first = stage_1(height=8, width=8, guidance_scale=7.0, **common).images
        second = stage_2(image=first, guidance_scale=4.0, noise_level=250, redraw_augmentation_noise=True, **common)
    else:
        first_class, second_class = ((IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline) if mode == "img2img"
                                     else (IFInpaintingPipeline, IFInpaintingSuperResolutionPipeline))  # fmt: skip
        first_stage = first_class(**stage_1.components)
        second_stage = second_class(**stage_2.components)
        for stage in (first_stage, second_stage):
            stage.set_progress_bar_config(disable=True)
        masks = [{} if mask is None else {"mask_image": (torch.nn.functional.interpolate(
            mask, size, mode="bilinear", antialias=True) >= 0.5).float()} for size in sizes]  # fmt: skip
        first = first_stage(image=resize(source, sizes[0]), strength=1.0, guidance_scale=10.0 if mask is None else 7.0,
                            **masks[0], **common).images  # fmt: skip
        second = second_stage(image=first, original_image=resize(source, sizes[1]), strength=1.0, guidance_scale=4.0,
                              noise_level=250 if mask is None else 0, redraw_augmentation_noise=True, **masks[1],
                              **common)  # fmt: skip
    second = second.images
    if not with_stage_3:
        return first, second, None
    third = stage_3(prompt=PROMPTS, image=(second + 1) / 2, num_inference_steps=2, guidance_scale=9.0,
                    noise_level=20, generator=generator, output_type="pt").images * 2 - 1  # fmt: skip
    if mask is not None:
        hard = (torch.nn.functional.interpolate(mask, sizes[2], mode="bilinear", antialias=True) >= 0.5).float()
        third = torch.lerp(resize(source, sizes[2]), third, hard)
    return first, second, third


@pytest.mark.parametrize("with_stage_3", [True, False], ids=["stage_3", "no_stage_3"])
@pytest.mark.parametrize("mode", ["text2img", "img2img", "inpaint"])
def test_cascade_equals_the_stage_pipelines_chained(cascade, pipeline_components, tiny_upscaler, mode, with_stage_3):
    pipeline = cascade(with_stage_3)
    source, mask = (_source(), _mask() if mode == "inpaint" else None) if mode != "text2img" else (None, None)
    sizes = [(8, 8), (32, 32), (128, 128)] if mode == "text2img" else [(22, 16), (88, 64), (352, 256)]
    call = dict(image=source, mask_image=mask) if mode != "text2img" else dict(height=8, width=8)
    output = pipeline(PROMPTS, **call, generator=torch.Generator().manual_seed(0), output_type="pt",
                      return_intermediates=True, **{k: v for k, v in STEPS.items() if with_stage_3 or "3" not in k})  # fmt: skip
    stages = _stages(pipeline_components, tiny_upscaler, with_stage_3)
    if with_stage_3:  # from_stages keeps the given stage-III scheduler (DDIM here); run the same by hand
        assert isinstance(pipeline.stage_3_scheduler, DDIMScheduler)
    first, second, third = _by_hand(stages, mode, torch.Generator().manual_seed(0), source, mask, sizes, with_stage_3)

    assert output.stage_1_images.shape == (2, 3, *sizes[0])
    torch.testing.assert_close(output.stage_1_images, first, rtol=0, atol=0)
    if with_stage_3:
        torch.testing.assert_close(output.stage_2_images, second, rtol=0, atol=0)
        assert output.images.shape == (2, 3, *sizes[2])
        torch.testing.assert_close(output.images, third, rtol=0, atol=0)
    else:
        assert output.stage_2_images is None and output.images.shape == (2, 3, *sizes[1])
        torch.testing.assert_close(output.images, second, rtol=0, atol=0)
    assert torch.isfinite(output.images).all() and output.images.abs().max() <= 1


def test_stage_2_low_res_consistency_factor_reaches_stage_ii(cascade, pipeline_components, tiny_upscaler):
    """`stage_2_low_res_consistency_factor` and its late factor and timestep give stage II's own
    `low_res_consistency_*` images, which differ from those without them."""
    call = dict(generator=torch.Generator().manual_seed(0), output_type="pt", **STEPS)
    late = dict(low_res_consistency_late_factor=2, low_res_consistency_late_timestep=500)
    held = cascade(False)(PROMPTS, height=8, width=8, stage_2_low_res_consistency_factor=4,
                          **{f"stage_2_{key}": value for key, value in late.items()}, **call).images  # fmt: skip
    stage_1, stage_2, _ = _stages(pipeline_components, tiny_upscaler, False)
    common = dict(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", num_inference_steps=2)
    first = stage_1(height=8, width=8, guidance_scale=7.0, **common).images
    second = stage_2(image=first, guidance_scale=4.0, noise_level=250, redraw_augmentation_noise=True,
                     low_res_consistency_factor=4, **late, **common).images  # fmt: skip
    torch.testing.assert_close(held, second, rtol=0, atol=0)
    call["generator"] = torch.Generator().manual_seed(0)
    assert (cascade(False)(PROMPTS, height=8, width=8, **call).images - held).abs().max() > 1e-2


def test_inpainting_keeps_the_unmasked_pixels_at_every_stage(cascade):
    source, mask = _source(), _mask()
    output = cascade()(PROMPTS, image=source, mask_image=mask, generator=torch.Generator().manual_seed(1),
                       output_type="pt", return_intermediates=True, **STEPS)  # fmt: skip
    for images in (output.stage_1_images, output.stage_2_images, output.images):
        size = tuple(images.shape[-2:])
        keep = (torch.nn.functional.interpolate(mask, size, mode="bilinear", antialias=True) < 0.5).expand_as(images)
        torch.testing.assert_close(images[keep], resize(source, size).expand_as(images)[keep], rtol=0, atol=1e-6)
        repainted = ~keep
        assert not torch.allclose(images[repainted], resize(source, size).expand_as(images)[repainted], atol=1e-2)


def test_images_per_prompt_and_stage_3_prompts_follow_the_image_order(cascade, monkeypatch):
    pipeline = cascade()
    seen = {}
    original_call = StableDiffusionUpscalePipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(prompt=kwargs["prompt"], negative_prompt=kwargs["negative_prompt"], batch=kwargs["image"].shape[0])
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionUpscalePipeline, "__call__", spy)
    output = pipeline(PROMPTS, negative_prompt=["blurry", "dark"], num_images_per_prompt=2, height=8, width=8,
                      generator=torch.Generator().manual_seed(0), output_type="np", **STEPS)  # fmt: skip
    assert output.images.shape == (4, 128, 128, 3)
    assert seen == {"prompt": ["a red circle", "a red circle", "a green square", "a green square"],
                    "negative_prompt": ["blurry", "blurry", "dark", "dark"], "batch": 4}  # fmt: skip


def test_prompt_embeds_with_a_stage_3_prompt(cascade, tiny_text):
    pipeline = cascade()
    embeds, negative = pipeline._stage_pipelines("text2img")[0].encode_prompt(PROMPTS, True)
    by_text = pipeline(PROMPTS, height=8, width=8, generator=torch.Generator().manual_seed(0), output_type="pt",
                       **STEPS).images  # fmt: skip
    by_embeds = pipeline(prompt_embeds=embeds, negative_prompt_embeds=negative, stage_3_prompt=PROMPTS, height=8,
                         width=8, generator=torch.Generator().manual_seed(0), output_type="pt", **STEPS).images  # fmt: skip
    torch.testing.assert_close(by_embeds, by_text, rtol=0, atol=0)


def test_t5_runs_once_per_call(cascade, monkeypatch):
    pipeline = cascade()
    calls = []
    hook = pipeline.text_encoder.register_forward_hook(lambda *args: calls.append(1))  # the session's shared T5
    try:
        pipeline(PROMPTS, height=8, width=8, output_type="pt", **STEPS)
    finally:
        hook.remove()
    assert len(calls) == 2  # the prompts, and the empty negative prompts: each once, reused by stages I and II


def test_callback_runs_at_every_step_of_stages_1_and_2(cascade):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((type(pipe).__name__, tensors["intermediate_images"].shape[-1]))
        return tensors

    cascade()(PROMPTS, height=8, width=8, output_type="pt", callback_on_step_end=callback, **STEPS)
    assert seen == [("IFPipeline", 8)] * 2 + [("IFSuperResolutionPipeline", 32)] * 2


@pytest.mark.parametrize("last_stage", [1, 2])
def test_last_stage_returns_that_stages_images_of_a_full_call(cascade, last_stage):
    """Candidates first, upscaling later: `last_stage=N` returns stage N's images of the full call with the same
    generators, and runs no later stage."""
    pipeline = cascade()
    run = dict(height=8, width=8, output_type="pt", **STEPS)
    full = pipeline(PROMPTS, generator=[torch.Generator().manual_seed(k) for k in (3, 4)], return_intermediates=True,
                    **run)  # fmt: skip
    later = [pipeline.stage_2_unet, pipeline.stage_3_unet][last_stage - 1]
    hook = later.register_forward_pre_hook(lambda *args: pytest.fail("a later stage ran"))
    try:
        output = pipeline(PROMPTS, generator=[torch.Generator().manual_seed(k) for k in (3, 4)], last_stage=last_stage,
                          return_intermediates=True, **run)  # fmt: skip
    finally:
        hook.remove()
    expected = [full.stage_1_images, full.stage_2_images][last_stage - 1]
    assert torch.equal(output.images, expected)
    assert output.stage_2_images is None and (last_stage == 1) == (output.stage_1_images is None)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_callback_setting_interrupt_stops_the_cascade_after_that_step(cascade, stage):
    """diffusers' way to stop a call: the callback sets `pipe._interrupt`; no later step or stage runs, the stage's
    images so far come back and `interrupt` reads True (False again at the next call)."""
    pipeline = cascade()
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((type(pipe).__name__, step))
        if len(seen) == (1 if stage == 1 else 3):
            pipe._interrupt = True
        return tensors

    hook = pipeline.stage_3_unet.register_forward_pre_hook(lambda *args: pytest.fail("stage III ran"))
    try:
        output = pipeline(PROMPTS, height=8, width=8, output_type="pt", callback_on_step_end=callback, **STEPS)
    finally:
        hook.remove()
    stopped = ("IFPipeline", 0) if stage == 1 else ("IFSuperResolutionPipeline", 0)
    assert seen[-1] == stopped and len(seen) == (1 if stage == 1 else 3)
    assert output.images.shape[-1] == (8 if stage == 1 else 32) and pipeline.interrupt
    pipeline(PROMPTS, height=8, width=8, output_type="pt", last_stage=1, **STEPS)
    assert not pipeline.interrupt


def _safety_components(flag: bool):
    config = CLIPConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=8),
                        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=40))  # fmt: skip
    torch.manual_seed(0)
    checker = IFSafetyChecker(config).eval()
    with torch.no_grad():  # a certain verdict: the heads' bias far on one side of the 0.5 threshold
        checker.p_head.weight.zero_()
        checker.p_head.bias.fill_(10.0 if flag else -10.0)
        checker.w_head.weight.zero_()
        checker.w_head.bias.fill_(-10.0)
    watermarker = IFWatermarker()
    watermarker.watermark_image[..., :3] = 255.0  # a white, opaque mark
    watermarker.watermark_image[..., 3] = 255.0
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return dict(safety_checker=checker, feature_extractor=extractor, watermarker=watermarker)


@pytest.mark.parametrize("flag", [True, False], ids=["flagged", "clean"])
def test_safety_checker_and_watermark_on_final_and_intermediate_images(pipeline_components, tiny_upscaler, flag):
    stages = _stages(pipeline_components, tiny_upscaler)
    stage_1 = IFPipeline(**{**stages[0].components, **_safety_components(flag)})
    pipeline = IFCascadePipeline.from_stages(stage_1, *stages[1:])
    pipeline.set_progress_bar_config(disable=True)
    run = dict(height=8, width=8, return_intermediates=True, **STEPS)
    output = pipeline(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **run)
    assert output.nsfw_detected == [flag, flag] and output.watermark_detected == [False, False]
    for images in (output.images, output.stage_1_images, output.stage_2_images):
        assert torch.all(images == -1) == flag
    # PIL: watermarked (diffusers' watermarker cannot mark the 8px intermediates: final images only here)
    pil = pipeline(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pil", **{**run,
                   "return_intermediates": False}).images[0]  # fmt: skip
    scale = pil.width / 1024  # IFWatermarker: a 62 * scale mark ending 14 * scale from the bottom-right corner
    end, size = pil.width - int(14 * scale), int(62 * scale)
    assert (np.asarray(pil)[end - size + 1 : end - 1, end - size + 1 : end - 1] == 255).all()


def test_save_and_reload(cascade, tmp_path):
    pipeline = cascade()
    pipeline.save_pretrained(tmp_path / "cascade")
    index = json.loads((tmp_path / "cascade" / "model_index.json").read_text())
    assert index["stage_3_unet"] == ["diffusers", "UNet2DConditionModel"]
    for loaded in (IFCascadePipeline.from_pretrained(tmp_path / "cascade"),
                   DiffusionPipeline.from_pretrained(tmp_path / "cascade", trust_remote_code=True)):  # fmt: skip
        assert type(loaded) is IFCascadePipeline
        assert type(loaded.stage_1_unet) is IFUNet2DConditionModel
        assert type(loaded.stage_2_unet) is IFSuperResUNet2DConditionModel
        loaded.set_progress_bar_config(disable=True)
        call = dict(height=8, width=8, output_type="pt", **STEPS)
        torch.testing.assert_close(
            loaded(PROMPTS, generator=torch.Generator().manual_seed(0), **call).images,
            pipeline(PROMPTS, generator=torch.Generator().manual_seed(0), **call).images, rtol=0, atol=0,
        )  # fmt: skip


def test_without_stage_3_saves_and_reloads_without_it(cascade, tmp_path):
    cascade(with_stage_3=False).save_pretrained(tmp_path / "cascade")
    loaded = IFCascadePipeline.from_pretrained(tmp_path / "cascade")
    assert not loaded.has_stage_3 and loaded.stage_3_vae is None


@pytest.fixture
def stage_folders(pipeline_components, tiny_upscaler, tmp_path):
    stages = _stages(pipeline_components, tiny_upscaler)
    for name, stage in zip(("stage_1", "stage_2", "stage_3"), stages):
        stage.save_pretrained(tmp_path / name)  # stage 2's folder holds a T5 too, as DeepFloyd's IF-II repos
    return {name: tmp_path / name for name in ("stage_1", "stage_2", "stage_3")}


def test_from_pretrained_stages_loads_t5_once(stage_folders, monkeypatch):
    loads = []
    original = T5EncoderModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(counting))
    pipeline = IFCascadePipeline.from_pretrained_stages(**stage_folders)
    assert len(loads) == 1 and str(stage_folders["stage_1"]) in str(loads[0])
    assert isinstance(pipeline.stage_3_scheduler, DDPMScheduler)  # the original runs the x4 upscaler with DDPM
    assert type(pipeline.stage_2_unet) is IFSuperResUNet2DConditionModel
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(PROMPTS, height=8, width=8, output_type="pt", **STEPS).images
    assert images.shape == (2, 3, 128, 128)


def _no_weights_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the stage configs were checked")

    for cls in (IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_from_pretrained_stages_rejects_bad_folders_before_loading(stage_folders, tmp_path, monkeypatch):
    _no_weights_load(monkeypatch)
    with pytest.raises(ValueError, match=r"stage_1='/nonexistent/IF-I': no such folder"):
        IFCascadePipeline.from_pretrained_stages("/nonexistent/IF-I", stage_folders["stage_2"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"stage_2=.*empty' has no model_index.json"):
        IFCascadePipeline.from_pretrained_stages(stage_folders["stage_1"], tmp_path / "empty")
    with pytest.raises(ValueError, match=r"stage_1=.*takes 6 input channels \(a super-resolution.*pass it as stage_2"):
        IFCascadePipeline.from_pretrained_stages(stage_folders["stage_2"], stage_folders["stage_2"])
    with pytest.raises(ValueError, match=r"stage_3=.*takes 3 input channels.*expected 7"):
        IFCascadePipeline.from_pretrained_stages(stage_folders["stage_1"], stage_folders["stage_2"],
                                                 stage_folders["stage_1"])  # fmt: skip


def test_from_pretrained_stages_rejects_mismatched_t5_widths(stage_folders, pipeline_components, tmp_path,
                                                             monkeypatch):  # fmt: skip
    from if_diffusers.models.original_params import OriginalUNetParams

    params = {**STAGE_II_CONFIGS["super_res"], "encoder_dim": 32}
    wide = IFSuperResUNet2DConditionModel.from_config(OriginalUNetParams.parse(params).to_unet_config())
    IFSuperResolutionPipeline(**{**pipeline_components("II"), "unet": wide}).save_pretrained(tmp_path / "wide")
    _no_weights_load(monkeypatch)
    with pytest.raises(ValueError, match=r"disagree on the T5 width .*T5 d_model\): 24.*unet: 24.*unet: 32"):
        IFCascadePipeline.from_pretrained_stages(stage_folders["stage_1"], tmp_path / "wide")


def test_from_stages_and_constructor_reject_misfits(pipeline_components, tiny_upscaler):
    stage_1, stage_2, stage_3 = _stages(pipeline_components, tiny_upscaler)
    with pytest.raises(ValueError, match=r"stage_1_unet: its UNet takes 6 input channels.*pass it as stage_2"):
        IFCascadePipeline.from_stages(stage_2, stage_2)
    with pytest.raises(ValueError, match=r"stage_2 \(IFPipeline\) lacks \['image_noising_scheduler'\]"):
        IFCascadePipeline.from_stages(stage_1, stage_1)
    components = IFCascadePipeline.from_stages(stage_1, stage_2, stage_3).components
    with pytest.raises(ValueError, match=r"stage III needs all of .*got only \['stage_3_unet'\]"):
        IFCascadePipeline(**{**components, **{k: None for k in components if k.startswith("stage_3_")},
                             "stage_3_unet": stage_3.unet})  # fmt: skip
    from transformers import T5Config

    wide_t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match=r"T5 width \(text_encoder \(T5 d_model\): 32, stage_1_unet: 24, stage_2_"):
        IFCascadePipeline(**{**components, "text_encoder": wide_t5})


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(mask_image=_mask()), r"mask_image was given without image"),
        (dict(image=_source(), stage_2_strength=0.0), r"stage 2 \(the stage_2_\* arguments\): strength=0.0"),
        (dict(stage_1_strength=0.5), r"stage 1 \(the stage_1_\* arguments\): strength=0.5 applies to img2img and"),
        (dict(stage_2_strength=0.8), r"stage 2 \(the stage_2_\* arguments\): strength=0.8 .*text-to-image runs"),
        (dict(stage_1_strength=True), r"stage 1 \(the stage_1_\* arguments\): strength=True applies to img2img"),
        (dict(stage_1_guidance_scale="high"), r"stage 1 .*guidance_scale='high'"),
        (dict(stage_2_guidance_scale=float("nan")), r"stage 2 .*guidance_scale=nan: expected a finite number"),
        (dict(stage_3_guidance_scale=float("inf")), r"stage_3_guidance_scale=inf: expected a finite number"),
        (dict(stage_2_redraw_augmentation_noise="no"), r"stage_2_redraw_augmentation_noise='no': expected True or"),
        (dict(clean_caption=1), r"clean_caption=1: expected True or False"),
        (dict(stage_2_noise_level=1000), r"stage 2 .*noise_level=1000"),
        (dict(stage_2_low_res_consistency_factor=3), r"stage 2 .*low_res_consistency_factor=3: .*\(64, 64\)"),
        (
            dict(stage_2_low_res_consistency_factor=4, stage_2_low_res_consistency_late_factor=2),
            r"stage 2 .*low_res_consistency_late_timestep=None and low_res_consistency_late_factor=2: expected both",
        ),
        (dict(stage_1_timesteps="smart100", stage_1_num_inference_steps=3), r"stage_1_timesteps and stage_1_num"),
        (dict(stage_2_timesteps="fast9"), r"stage 2 .*fast9"),
        (dict(stage_3_noise_level=351), r"stage_3_noise_level=351: expected an int in \[0, 350\]"),
        (dict(stage_3_num_inference_steps=0), r"stage_3_num_inference_steps=0"),
        (dict(height=7), r"height=7"),
        (dict(image=_source(batch=3)), r"image has batch size 3; expected 2"),
        (dict(image=_source(), mask_image=_mask((32, 32))), r"mask_image has size \(32, 32\); expected .*\(64, 48\)"),
        (dict(image=_source(), height=16), r"height=16, width=None: with image"),
        (dict(output_type="latent"), r"output_type='latent'"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 24)), r"pass stage_3_prompt as text"),
        (dict(last_stage=4), r"last_stage=4: expected an int in \[1, 3\] \(this cascade has 3 stages\)"),
        (dict(last_stage=True), r"last_stage=True: expected an int"),
    ],
)
def test_bad_input_fails_before_any_model_runs(cascade, call, message):
    """`__call__` and `check_inputs` (the same checks, no model at all) refuse it alike."""
    pipeline = cascade()

    def refuse(*args):
        raise RuntimeError("a model ran")

    # the components are the session's shared tiny models: the hooks must go again
    hooks = [
        c.register_forward_pre_hook(refuse) for c in pipeline.components.values() if isinstance(c, torch.nn.Module)
    ]
    try:
        for method in (pipeline, pipeline.check_inputs):
            with pytest.raises(ValueError, match=message):
                method(**{"prompt": PROMPTS, **call})
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("mode", ["text2img", "img2img", "inpaint"])
def test_check_inputs_accepts_a_good_call_without_running_a_model(cascade, mode):
    pipeline = cascade()
    calls = []
    hooks = [c.register_forward_pre_hook(lambda *args: calls.append(1)) for c in pipeline.components.values()
             if isinstance(c, torch.nn.Module)]  # fmt: skip
    images = {"img2img": dict(image=_source()), "inpaint": dict(image=_source(), mask_image=_mask())}.get(mode, {})
    try:
        assert pipeline.check_inputs(PROMPTS, **images, stage_1_guidance_scale=5.0) is None
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [] and not pipeline._checks_only_calls.ids


def test_offload_sequence_names_every_model(cascade):
    pipeline = cascade()
    models = {name for name, c in pipeline.components.items() if isinstance(c, torch.nn.Module)}
    sequence = pipeline.model_cpu_offload_seq.split("->")
    assert set(sequence) == models - {"safety_checker", "watermarker"} and len(sequence) == len(set(sequence))
