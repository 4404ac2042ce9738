"""What the six pipelines offer beyond plain generation: step callbacks and the properties they read, offloading,
`from_pipe`, LoRA, `save_pretrained` round trips, prompt encoding (long prompts, caption cleaning, diffusers
parity) and the original IF's options (style prompt, positive-prompt mixing, redrawn augmentation noise, dynamic
thresholding per stage). All on the tiny components of `conftest.py`, with 2-4 steps."""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import json
import logging
import textwrap
from pathlib import Path

import deepfloyd_if
import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.models.attention_processor import AttnAddedKVProcessor2_0
from transformers import T5EncoderModel

import if_diffusers
from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.guidance import classifier_free_guidance, low_pass, low_res_consistency
from if_diffusers.pipelines.conditioning import LowResConsistency
from if_diffusers.scheduling import denoising_scheduler
from if_diffusers.text import clean_caption, preprocess_prompts

PROMPT = "a red circle on a blue background"
OTHER_PROMPT = "a small green square at the top left"
STEPS = 4


def _images(seed: int, size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(seed: int, size: int) -> torch.Tensor:
    return (torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


# pipeline -> (stage, its image arguments, the share of the STEPS it runs)
CASES = {
    "IFPipeline": ("I", {}, 1.0),
    "IFImg2ImgPipeline": ("I", dict(image=_images(1, 16), strength=0.5), 0.5),
    "IFInpaintingPipeline": ("I", dict(image=_images(2, 16), mask_image=_mask(3, 16), strength=0.75), 0.75),
    "IFSuperResolutionPipeline": ("II", dict(image=_images(4, 8)), 1.0),
    "IFImg2ImgSuperResolutionPipeline": ("II", dict(image=_images(5, 8), original_image=_images(6, 32), strength=0.5),
                                         0.5),
    "IFInpaintingSuperResolutionPipeline": ("II", dict(image=_images(7, 8), original_image=_images(8, 32),
                                                       mask_image=_mask(9, 32), strength=0.75), 0.75),
}  # fmt: skip
STAGE_I = ["IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"]
STAGE_II = ["IFSuperResolutionPipeline", "IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline"]


def _pipeline(name: str, components: dict):
    pipeline = getattr(if_diffusers, name)(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _own_models(components: dict) -> dict:
    """The components with private copies of the UNet and T5, for tests that hook, offload or patch them (the
    fixture's models are shared by the whole session)."""
    return dict(components, unet=copy.deepcopy(components["unet"]),
                text_encoder=copy.deepcopy(components["text_encoder"]))  # fmt: skip


def _run(pipeline, name: str, seed: int = 0, **kwargs) -> torch.Tensor:
    """`(B, 3, H, W)` images in `[-1, 1]` of `pipeline` on its case's inputs."""
    arguments = dict(CASES[name][1], prompt=PROMPT, num_inference_steps=STEPS, output_type="pt")
    arguments.update(kwargs)
    if "prompt_embeds" in kwargs:
        arguments.pop("prompt")
    return pipeline(**arguments, generator=torch.Generator().manual_seed(seed)).images


@contextlib.contextmanager
def _unet_calls(unet):
    """Record the inputs of every UNet forward: `sample`, `timestep` and the keyword arguments."""
    calls: list[dict] = []

    def record(module, args, kwargs):
        calls.append(dict(kwargs, sample=args[0].clone(), timestep=args[1]))

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --- callbacks and properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_callback_on_step_end_gets_each_step_once_with_the_named_tensors(pipeline_components, name):
    """`callback_on_step_end(pipe, i, t, tensors)` runs once per denoising step, with the step index, that step's
    timestep and the tensors named in `callback_on_step_end_tensor_inputs`; the properties a callback reads hold
    this call's values while it runs and after."""
    stage, _, share = CASES[name]
    pipeline = _pipeline(name, pipeline_components(stage))
    seen = []

    def callback(pipe, i, t, tensors):
        assert pipe is pipeline
        seen.append(dict(i=i, t=t, keys=sorted(tensors), images=tensors["intermediate_images"].shape,
                         embeds=tensors["prompt_embeds"].shape, guidance_scale=pipe.guidance_scale,
                         cfg=pipe.do_classifier_free_guidance, num_timesteps=pipe.num_timesteps,
                         interrupt=pipe.interrupt, cross_attention_kwargs=pipe.cross_attention_kwargs))  # fmt: skip
        return {}

    kwargs = {"scale": 1.0}
    images = _run(pipeline, name, guidance_scale=5.0, cross_attention_kwargs=kwargs, callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["intermediate_images", "prompt_embeds"])  # fmt: skip
    steps = int(STEPS * share)
    expected_timesteps = pipeline.scheduler.timesteps[STEPS - steps :]
    assert [s["i"] for s in seen] == list(range(steps))
    assert [int(s["t"]) for s in seen] == expected_timesteps.tolist()
    for step in seen:
        assert step["keys"] == ["intermediate_images", "prompt_embeds"]
        assert step["images"] == images.shape
        assert step["embeds"][0] == 2 * images.shape[0]  # [uncond, cond]
        state = (step["guidance_scale"], step["cfg"], step["num_timesteps"], step["interrupt"])
        assert state == (5.0, True, steps, False)
        assert step["cross_attention_kwargs"] == kwargs
    state = (pipeline.guidance_scale, pipeline.do_classifier_free_guidance, pipeline.num_timesteps)
    assert state == (5.0, True, steps)
    assert pipeline.interrupt is False and pipeline.cross_attention_kwargs == kwargs

    _run(pipeline, name, guidance_scale=1.0)
    assert (pipeline.guidance_scale, pipeline.do_classifier_free_guidance, pipeline.cross_attention_kwargs) == (
        1.0, False, None,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["IFPipeline", "IFInpaintingSuperResolutionPipeline"])
def test_callback_replacing_intermediate_images_changes_what_follows(pipeline_components, name):
    """Images a callback returns are what the next step denoises, and what the pipeline returns after the last one
    (the inpainting blend runs before the callback, so the replacement is not blended again)."""
    stage, _, share = CASES[name]
    pipeline = _pipeline(name, pipeline_components(stage))
    steps = int(STEPS * share)
    size = 16 if stage == "I" else 32
    replacement = torch.linspace(-0.5, 0.5, 3 * size * size).reshape(1, 3, size, size)

    def callback(pipe, i, t, tensors):
        return {"intermediate_images": replacement.clone()} if i in (0, steps - 1) else {}

    with _unet_calls(pipeline.unet) as calls:
        images = _run(pipeline, name, callback_on_step_end=callback)
    assert len(calls) == steps
    # the second UNet call gets the replacement as its noisy half (stage II: channels 0-2; 3-5 are the low-res)
    assert torch.equal(calls[1]["sample"][:1, :3], replacement)
    assert torch.equal(images, replacement)
    assert not torch.equal(_run(pipeline, name), replacement)


def test_callback_replacing_prompt_embeds_takes_effect(pipeline_components):
    """`prompt_embeds` (`(2B, L, D)`, `[uncond, cond]`) returned by a callback drive the following UNet calls; the
    UNet's text cache recomputes for them. Returning an equal copy changes nothing."""
    pipeline = _pipeline("IFPipeline", pipeline_components("I"))
    other, negative = pipeline.encode_prompt(OTHER_PROMPT)
    replacement = torch.cat([negative, other])

    def replace(pipe, i, t, tensors):
        return {"prompt_embeds": replacement} if i == 1 else {}

    with _unet_calls(pipeline.unet) as calls:
        replaced = _run(pipeline, "IFPipeline", callback_on_step_end=replace,
                        callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip
    original = calls[0]["encoder_hidden_states"]
    assert torch.equal(calls[1]["encoder_hidden_states"], original)
    assert all(torch.equal(c["encoder_hidden_states"], replacement) for c in calls[2:])
    assert not torch.equal(original, replacement)
    plain = _run(pipeline, "IFPipeline")
    assert (replaced - plain).abs().max() > 1e-3

    def copy_embeds(pipe, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"].clone()}

    same = _run(pipeline, "IFPipeline", callback_on_step_end=copy_embeds,
                callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip
    assert torch.equal(same, plain)


def test_legacy_callback_runs_every_callback_steps_with_a_future_warning(pipeline_components):
    """The deprecated `callback(i, t, images)` still runs every `callback_steps` steps, and both arguments raise
    diffusers' `deprecate` FutureWarning."""
    pipeline = _pipeline("IFPipeline", pipeline_components("I"))
    seen = []
    with pytest.warns(FutureWarning) as warnings:
        images = _run(pipeline, "IFPipeline", callback=lambda i, t, x: seen.append((i, int(t), x.clone())),
                      callback_steps=2)  # fmt: skip
    messages = [str(w.message) for w in warnings if issubclass(w.category, FutureWarning)]
    assert any("`callback`" in m for m in messages) and any("`callback_steps`" in m for m in messages)
    assert [(i, t) for i, t, _ in seen] == [(0, int(pipeline.scheduler.timesteps[0])),
                                            (2, int(pipeline.scheduler.timesteps[2]))]  # fmt: skip
    assert seen[0][2].shape == images.shape and not torch.equal(seen[0][2], seen[1][2])


def test_interrupt_set_by_a_callback_stops_the_unet(pipeline_components):
    """`pipe._interrupt = True` from a callback skips the remaining steps (no more UNet calls), as diffusers' loops
    do; `interrupt` stays True until the next call resets it."""
    pipeline = _pipeline("IFPipeline", pipeline_components("I"))

    def stop_after_second(pipe, i, t, tensors):
        if i == 1:
            pipe._interrupt = True
        return {}

    with _unet_calls(pipeline.unet) as calls:
        images = _run(pipeline, "IFPipeline", callback_on_step_end=stop_after_second)
    assert len(calls) == 2 and pipeline.interrupt is True
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    with _unet_calls(pipeline.unet) as calls:
        _run(pipeline, "IFPipeline")
    assert len(calls) == STEPS and pipeline.interrupt is False


class _RecordingProcessor(AttnAddedKVProcessor2_0):
    """diffusers' IF attention processor that records a `marker` cross-attention kwarg (diffusers passes on only
    the kwargs a processor's signature names)."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, marker=None):
        self.seen.append(marker)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)


@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_cross_attention_kwargs_reach_the_attention_processors(pipeline_components, name):
    """Every attention layer gets `cross_attention_kwargs` at every step."""
    components = _own_models(pipeline_components(CASES[name][0]))
    pipeline = _pipeline(name, components)
    plain = _run(pipeline, name)
    seen: list = []
    pipeline.unet.set_attn_processor(_RecordingProcessor(seen))
    recorded = _run(pipeline, name, cross_attention_kwargs={"marker": "here"})
    assert seen == ["here"] * (len(pipeline.unet.attn_processors) * STEPS)
    assert torch.equal(recorded, plain)  # the recording processor computes what the default one does


# --- offloading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_model_cpu_offload_runs_on_cpu_with_the_same_images(pipeline_components, name, monkeypatch):
    """`enable_model_cpu_offload(device="cpu")` installs accelerate hooks on T5 and the UNet (in
    `model_cpu_offload_seq` order), `__call__` ends with `maybe_free_model_hooks()`, and the images are those of
    the plain pipeline. Moving to an accelerator needs a GPU: `scripts/check_offload_gpu.py`."""
    stage = CASES[name][0]
    pipeline = _pipeline(name, _own_models(pipeline_components(stage)))
    plain = _run(pipeline, name)
    pipeline.enable_model_cpu_offload(device="cpu")
    assert pipeline._execution_device == torch.device("cpu", 0)
    assert hasattr(pipeline.unet, "_hf_hook") and hasattr(pipeline.text_encoder, "_hf_hook")
    assert len(pipeline._all_hooks) == 2
    freed = []
    free = pipeline.maybe_free_model_hooks
    monkeypatch.setattr(pipeline, "maybe_free_model_hooks", lambda: (freed.append(True), free()))
    assert torch.equal(_run(pipeline, name), plain)
    assert freed == [True]
    assert hasattr(pipeline.unet, "_hf_hook")  # re-installed for the next call


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_group_offload_runs_on_cpu_with_the_same_images(pipeline_components, name, offload_type):
    """`enable_group_offload(onload_device=cpu)` applies diffusers' group-offload hooks to T5 and the UNet, and the
    images are those of the plain pipeline (the UNet's text cache works under the hooks)."""
    pipeline = _pipeline(name, _own_models(pipeline_components(CASES[name][0])))
    plain = _run(pipeline, name)
    pipeline.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type,
                                  num_blocks_per_group=1 if offload_type == "block_level" else None)  # fmt: skip
    assert _is_group_offload_enabled(pipeline.unet) and _is_group_offload_enabled(pipeline.text_encoder)
    assert torch.equal(_run(pipeline, name), plain)


def test_sequential_cpu_offload_installs_its_hooks(pipeline_components):
    """`enable_sequential_cpu_offload(device="cpu")` puts every UNet and T5 weight on the meta device behind
    accelerate hooks. Running it needs an accelerator: diffusers executes on "cpu:0", where accelerate 1.15 cannot
    move weights back to meta after a layer runs (TypeError in `set_module_tensor_to_device`) for any model; see
    `scripts/check_offload_gpu.py` for the run."""
    pipeline = _pipeline("IFPipeline", _own_models(pipeline_components("I")))
    pipeline.enable_sequential_cpu_offload(device="cpu")
    assert pipeline._execution_device == torch.device("cpu", 0)
    for model in (pipeline.unet, pipeline.text_encoder):
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert hasattr(model, "_hf_hook")


# --- from_pipe ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chain", [STAGE_I, STAGE_II], ids=["stage_I", "super_resolution"])
def test_from_pipe_shares_components_and_matches_fresh_pipelines(pipeline_components, chain):
    """`Next.from_pipe(pipe)` along a stage's three classes gives our class, with the very same component objects
    (nothing copied or dropped: our UNet subclasses must pass diffusers' type check), and the images of a pipeline
    built fresh from the components."""
    components = pipeline_components(CASES[chain[0]][0])
    pipeline = _pipeline(chain[0], components)
    for name in chain[1:]:
        pipeline = getattr(if_diffusers, name).from_pipe(pipeline)
        pipeline.set_progress_bar_config(disable=True)
        assert type(pipeline) is getattr(if_diffusers, name)
        for key, component in pipeline.components.items():
            assert component is components[key], key
        assert pipeline.config.requires_safety_checker is False
        assert torch.equal(_run(pipeline, name), _run(_pipeline(name, components), name))


# --- LoRA -----------------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "encoder_hid_proj",
                "add_embedding.proj"]  # fmt: skip


@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_lora_load_scale_set_adapters_fuse_unload(pipeline_components, name, tmp_path):
    """A peft LoRA on our UNet (attention, text projection and pooling: the two cached by `text_cache`), saved with
    `save_lora_weights` and loaded with `load_lora_weights`, gives the images of the UNet it was made on;
    `scale` in `cross_attention_kwargs` and `set_adapters` weight it, `fuse_lora` bakes it in, `unfuse_lora` and
    `unload_lora_weights` restore the plain images. The UNet keeps our class throughout."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    components = _own_models(pipeline_components(CASES[name][0]))
    pipeline = _pipeline(name, components)
    plain = _run(pipeline, name)

    source = copy.deepcopy(components["unet"])
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    source.add_adapter(config)
    expected = _run(_pipeline(name, dict(components, unet=source)), name)
    type(pipeline).save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(source),
                                     unet_lora_adapter_metadata=config.to_dict())  # fmt: skip

    pipeline.load_lora_weights(tmp_path, adapter_name="tiny")
    assert type(pipeline.unet) is type(components["unet"])
    lora = _run(pipeline, name)
    assert (lora - plain).abs().max() > 1e-2
    assert torch.equal(lora, expected)
    assert torch.equal(_run(pipeline, name, cross_attention_kwargs={"scale": 0.0}), plain)
    half = _run(pipeline, name, cross_attention_kwargs={"scale": 0.5})
    assert (half - plain).abs().max() > 1e-3 and (half - lora).abs().max() > 1e-3
    pipeline.set_adapters(["tiny"], adapter_weights=[0.0])
    assert torch.equal(_run(pipeline, name), plain)
    pipeline.set_adapters(["tiny"], adapter_weights=[1.0])
    assert torch.equal(_run(pipeline, name), lora)
    pipeline.unload_lora_weights()  # never fused: the original weights are back exactly
    assert torch.equal(_run(pipeline, name), plain)
    assert type(pipeline.unet) is type(components["unet"])

    # fusing adds B @ A into the weights: float32 rounding of W + dW (and of W + dW - dW) differs from the unfused sum
    pipeline.load_lora_weights(tmp_path, adapter_name="tiny")
    pipeline.fuse_lora()
    assert (_run(pipeline, name) - lora).abs().max() < 1e-4
    pipeline.unfuse_lora()
    pipeline.unload_lora_weights()
    assert (_run(pipeline, name) - plain).abs().max() < 1e-4
    assert type(pipeline.unet) is type(components["unet"])


# --- save_pretrained / from_pretrained ------------------------------------------------------------------------


def _settings(scheduler) -> dict:
    """A scheduler's configuration without the bookkeeping keys (`_class_name`, `_use_default_values`, ...)."""
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_round_trip_keeps_our_classes(pipeline_components, name, tmp_path):
    """`save_pretrained` records our UNet class as a custom component (`["if_diffusers_model", class]`, the file
    beside its weights; pipelines/hub_layout.py), and `Class.from_pretrained` gives back our classes and the same
    images."""
    stage = CASES[name][0]
    pipeline = _pipeline(name, pipeline_components(stage))
    pipeline.save_pretrained(tmp_path)
    unet_class = IFUNet2DConditionModel if stage == "I" else IFSuperResUNet2DConditionModel
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["if_diffusers_pipeline", name]
    assert index["unet"] == ["if_diffusers_model", unet_class.__name__]
    assert (tmp_path / "unet" / "if_diffusers_model.py").is_file()

    loaded = getattr(if_diffusers, name).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is getattr(if_diffusers, name)
    assert type(loaded.unet) is unet_class
    assert type(loaded.scheduler) is DDPMScheduler and type(loaded.text_encoder) is T5EncoderModel
    assert type(loaded.tokenizer) is type(pipeline.tokenizer)
    assert _settings(loaded.scheduler) == _settings(pipeline.scheduler)
    if stage == "II":
        assert type(loaded.image_noising_scheduler) is DDPMScheduler
        assert _settings(loaded.image_noising_scheduler) == _settings(pipeline.image_noising_scheduler)
    assert loaded.safety_checker is None and loaded.watermarker is None
    assert torch.equal(_run(loaded, name), _run(pipeline, name))


def test_folders_load_across_diffusers_and_ours(pipeline_components, tmp_path):
    """diffusers' own `IFPipeline.save_pretrained` folder loads into ours with our UNet class (the same images, and
    style prompts work). Our folder loads into diffusers' `DiffusionPipeline` (with `trust_remote_code`, for the
    folder's `if_diffusers_pipeline.py`) as our classes."""
    components = pipeline_components("I")
    stock_unet = UNet2DConditionModel.from_config(components["unet"].config)
    stock_unet.load_state_dict(components["unet"].state_dict())
    diffusers.IFPipeline(**dict(components, unet=stock_unet)).save_pretrained(tmp_path / "theirs")
    index = json.loads((tmp_path / "theirs" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    ours = if_diffusers.IFPipeline.from_pretrained(tmp_path / "theirs")
    ours.set_progress_bar_config(disable=True)
    assert type(ours.unet) is IFUNet2DConditionModel
    assert torch.equal(_run(ours, "IFPipeline"), _run(_pipeline("IFPipeline", components), "IFPipeline"))
    _run(ours, "IFPipeline", style_prompt=OTHER_PROMPT)

    _pipeline("IFPipeline", components).save_pretrained(tmp_path / "ours")
    theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours", trust_remote_code=True)
    assert type(theirs) is if_diffusers.IFPipeline and type(theirs.unet) is IFUNet2DConditionModel


# --- prompts --------------------------------------------------------------------------------------------------

# ~100 tokens of the tiny T5 tokenizer (nearly one a character): more than 77, less than 128
LONG_PROMPT = " ".join([PROMPT, OTHER_PROMPT, "a large yellow triangle in the middle", "the words hello world"])


def _token_count(pipeline, text: str) -> int:
    return pipeline.tokenizer(preprocess_prompts(text, True), return_tensors="pt").input_ids.shape[-1]


def test_max_sequence_length_default_cut_and_longer(pipeline_components, caplog):
    """77 tokens by default, cut with a warning that names T5 and max_sequence_length (diffusers' names CLIP);
    `None` encodes the longest prompt in full (the negative prompt at the same length), a larger value pads."""
    pipeline = _pipeline("IFPipeline", pipeline_components("I"))
    full = _token_count(pipeline, LONG_PROMPT)
    assert 77 < full < 128
    with caplog.at_level(logging.WARNING, logger="if_diffusers"):
        cut, negative = pipeline.encode_prompt(LONG_PROMPT)
    assert cut.shape[1] == negative.shape[1] == 77
    assert any("T5" in r.message and "max_sequence_length" in r.message and "CLIP" not in r.message
               for r in caplog.records)  # fmt: skip

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="if_diffusers"):
        whole, negative = pipeline.encode_prompt(LONG_PROMPT, max_sequence_length=None)
        padded, _ = pipeline.encode_prompt(LONG_PROMPT, max_sequence_length=128)
        short, _ = pipeline.encode_prompt(PROMPT, max_sequence_length=None)
    assert not caplog.records
    assert whole.shape[1] == negative.shape[1] == full and padded.shape[1] == 128
    assert short.shape[1] == _token_count(pipeline, PROMPT)
    assert not torch.allclose(whole[:, :77], cut)  # T5 attends both ways: the cut tokens change the others


def test_longer_negative_prompt_is_not_cut_with_max_sequence_length_none(pipeline_components, caplog):
    """With `max_sequence_length=None` the prompt and negative prompt are padded to the longer of the two, so a
    long negative prompt is not cut to a short prompt's length; with a fixed length it is cut with a warning."""
    pipeline = _pipeline("IFPipeline", pipeline_components("I"))
    prompt_embeds, negative_embeds = pipeline.encode_prompt(PROMPT, negative_prompt=LONG_PROMPT,
                                                            max_sequence_length=None)  # fmt: skip
    assert prompt_embeds.shape[1] == negative_embeds.shape[1] == _token_count(pipeline, LONG_PROMPT)
    with caplog.at_level(logging.WARNING, logger="if_diffusers"):
        pipeline.encode_prompt(PROMPT, negative_prompt=LONG_PROMPT)
    assert any(r.message.startswith("negative_prompt was cut at 77") for r in caplog.records)


@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_long_prompts_run_through_the_unet(pipeline_components, name, caplog):
    """With `max_sequence_length=None` the UNet attends to every token (more than 77), style prompt included, and
    nothing is cut."""
    pipeline = _pipeline(name, pipeline_components(CASES[name][0]))
    with _unet_calls(pipeline.unet) as calls, caplog.at_level(logging.WARNING, logger="if_diffusers"):
        images = _run(pipeline, name, max_sequence_length=None, style_prompt=LONG_PROMPT, num_inference_steps=2)
    assert not caplog.records
    assert calls[0]["encoder_hidden_states"].shape[1] == _token_count(pipeline, LONG_PROMPT) > 77
    assert calls[0]["added_cond_kwargs"]["text_embeds"].shape == calls[0]["encoder_hidden_states"].shape
    assert torch.isfinite(images).all()


def test_clean_caption_defaults_to_true_everywhere():
    """One default for `clean_caption`: True in the six `__call__`s and in `encode_prompt` (diffusers' is False)."""
    for name in CASES:
        cls = getattr(if_diffusers, name)
        for method in (cls.__call__, cls.encode_prompt):
            assert inspect.signature(method).parameters["clean_caption"].default is True, (name, method.__name__)
        assert inspect.signature(cls.__call__).parameters["max_sequence_length"].default == 77


CAPTIONS = [
    "Check https://www.example.com/path?x=1 and www.test.org now",
    "<b>Bold</b> &amp; <i>italic</i> &quot;quoted&quot; text <person> here",
    "Hello @john_doe and @Jane123! \U0001f600\U0001f389 emoji party",
    "中文字符 mixed with English 日本語 and 한국어 ㇀ ㋐ ㌀ 㐀 ䷀",
    "Photo taken 2023-05-12 at 12:30 on 192.168.0.1",
    "File IMG_1234.jpg and document.pdf, also picture.PNG and clip.mp4",
    "‘Single’ and “double” quotes «guillemets» `tick´ ¨",
    "#hashtag #123 #123456 #trending and 1234567 numbers",
    "long — dash – en dash ― horizontal bar ‐ hyphen ﹣ small",
    "this-is-my-cute-cat and this_is_my_cute_cat",
    "Free shipping worldwide! Click on link, free download now",
    "jc6640 jc6640vc 6640vc231 j2d1a2a3b size 1920x1080 3.5×2",
    "page 12 of the book... really.... ok",
    "   Leading and trailing spaces   ",
    '"A caption fully in quotes"',
    "Text with \\n escaped newline and real\nnewline",
    "%20url%20encoded+plus+signs%C3%A9",
    PROMPT,
    "Ünïcödé ÀÉÎÕÜ straße ﬁ ligature",
    "price: $19.99 | 50% off [sale] {new} (limited) *star* ~tilde~ ®©™",
    ".hiddenfile",
    "shop at amazon.com/dp/B000 or ebay.co.uk today",
    "",
    "A photo of Mr. Smith, Jr.; with 'apostrophes'",
    "mojibake: cafÃ© and â€™ quotes",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ～ wave dash 〜",
    "<a href='http://x.com'>link</a> &lt;tag&gt; &#39;ent&#39;",
    "a : b , c . d",
    "article 1:23   ",
    "''double single'' and ___under___",
]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_clean_caption_matches_diffusers(caption):
    """Our one `clean_caption` gives what diffusers' `_clean_caption` (the original's, copied into its six IF
    pipelines) gives, for one pass and for the two passes both apply; `preprocess_prompts` = `_text_preprocessing`."""
    theirs = diffusers.IFPipeline.__new__(diffusers.IFPipeline)
    assert clean_caption(caption) == theirs._clean_caption(caption)
    for clean in (True, False):
        assert preprocess_prompts(caption, clean) == theirs._text_preprocessing(caption, clean_caption=clean)


ENCODE_CASES = [
    dict(prompt=PROMPT),
    dict(prompt=[PROMPT, "A SIGN, with https://x.com/y"], negative_prompt=["blurry @someone", "jpeg artifacts"],
         num_images_per_prompt=2),
    dict(prompt="Hello  World", negative_prompt="IMG_1.jpg", clean_caption=False),
    dict(prompt=[PROMPT, OTHER_PROMPT], do_classifier_free_guidance=False),
    dict(prompt=LONG_PROMPT, negative_prompt=LONG_PROMPT),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(ENCODE_CASES)))
def test_encode_prompt_matches_diffusers(pipeline_components, case):
    """`encode_prompt` (at the default 77 tokens) returns diffusers' tensors for the same arguments, given
    `clean_caption` explicitly since the defaults differ; prompt embeddings passed in come back as they were."""
    ours = _pipeline("IFPipeline", pipeline_components("I"))
    theirs = diffusers.IFPipeline(**pipeline_components("I"))
    arguments = dict(dict(clean_caption=True), **ENCODE_CASES[case])
    expected, result = theirs.encode_prompt(**arguments), ours.encode_prompt(**arguments)
    assert torch.equal(result[0], expected[0])
    assert (result[1] is None) == (expected[1] is None) and (result[1] is None or torch.equal(result[1], expected[1]))

    given = dict(arguments, prompt=None, prompt_embeds=expected[0][:1] * 2, num_images_per_prompt=1)
    given.pop("negative_prompt", None)
    expected, result = theirs.encode_prompt(**given), ours.encode_prompt(**given)
    assert torch.equal(result[0], expected[0]) and torch.equal(result[0], given["prompt_embeds"])
    assert (result[1] is None) == (expected[1] is None) and (result[1] is None or torch.equal(result[1], expected[1]))


# --- the original's options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [7.0, 1.0])
@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_style_prompt(pipeline_components, name, guidance_scale):
    """A style prompt equal to the prompt gives the image without one (it only replaces the pooled text); another
    style prompt changes it, with or without guidance."""
    pipeline = _pipeline(name, pipeline_components(CASES[name][0]))
    prompt_embeds, _ = pipeline.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    style_embeds, _ = pipeline.encode_prompt(OTHER_PROMPT, do_classifier_free_guidance=False)
    plain = _run(pipeline, name, guidance_scale=guidance_scale)
    same = _run(pipeline, name, guidance_scale=guidance_scale, style_prompt_embeds=prompt_embeds)
    styled = _run(pipeline, name, guidance_scale=guidance_scale, style_prompt=OTHER_PROMPT)
    assert torch.equal(same, plain)
    assert (styled - plain).abs().max() > 1e-2
    assert torch.equal(_run(pipeline, name, guidance_scale=guidance_scale, style_prompt_embeds=style_embeds), styled)


@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_positive_mixer_zero_is_plain_guidance(pipeline_components, name):
    """A positive prompt mixed at 0 leaves classifier-free guidance as it is; at 0.5 it changes the image. The
    batch of three `[uncond, cond, positive]` instead of two moves the UNet's float32 outputs by rounding only
    (~3e-6 per call here), hence the tolerance; the guidance itself is exact (see the formula test)."""
    pipeline = _pipeline(name, pipeline_components(CASES[name][0]))
    plain = _run(pipeline, name)
    assert (_run(pipeline, name, positive_prompt=OTHER_PROMPT, positive_mixer=0.0) - plain).abs().max() < 1e-4
    assert (_run(pipeline, name, positive_prompt=OTHER_PROMPT, positive_mixer=0.5) - plain).abs().max() > 1e-2


def _original_model_fn(guidance_scale: float, positive_mixer: float, bs_scale: int, model):
    """`model_fn` of `deepfloyd_if/modules/base.py` `IFBaseModule.embeddings_to_image`, executed from its source
    (the module cannot be imported offline: it loads CLIP at import), with its closure variables supplied."""
    source = (Path(deepfloyd_if.__file__).parent / "modules" / "base.py").read_text()
    (function,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "model_fn"]
    namespace = dict(torch=torch, guidance_scale=guidance_scale, positive_mixer=positive_mixer, bs_scale=bs_scale,
                     self=type("Module", (), {"model": model}))  # fmt: skip
    exec(textwrap.dedent(ast.get_source_segment(source, function)), namespace)
    return namespace["model_fn"]


@pytest.mark.parametrize("positive_mixer", [None, 0.0, 0.25, 0.7])
def test_guidance_formula_is_the_originals(positive_mixer):
    """`classifier_free_guidance` on a UNet output batched `[uncond, cond(, positive)]` equals the original's
    `model_fn` on the same outputs batched its way, `[cond(, positive), uncond]`: the rows of the image's own half
    (guided epsilon, and the conditional prediction's variance)."""
    generator = torch.Generator().manual_seed(0)
    copies = 2 if positive_mixer is None else 3
    uncond, cond, positive = torch.randn(3, 2, 6, 4, 4, generator=generator)
    original_order = [cond, positive, uncond] if copies == 3 else [cond, uncond]
    model_fn = _original_model_fn(5.0, positive_mixer, copies, lambda x, ts, **kwargs: torch.cat(original_order))
    expected = model_fn(torch.zeros(copies * 2, 3, 4, 4), None)[:2]
    ours = classifier_free_guidance(torch.cat([uncond, cond, positive][:copies]), 5.0, 3, positive_mixer)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("name", STAGE_II)
def test_redraw_augmentation_noise_is_seeded_and_differs(pipeline_components, name):
    """`redraw_augmentation_noise=True` (the original's augmentation noise drawn at every UNet call) is
    reproducible from the generator and gives another image than noising the low-res input once."""
    pipeline = _pipeline(name, pipeline_components("II"))
    redrawn = _run(pipeline, name, redraw_augmentation_noise=True)
    assert torch.equal(_run(pipeline, name, redraw_augmentation_noise=True), redrawn)
    assert (_run(pipeline, name, redraw_augmentation_noise=False) - redrawn).abs().max() > 1e-3


def test_low_res_consistency_replaces_only_the_coarse_content():
    """ILVR's `x - phi_N(x) + phi_N(y)`: a reference offset by a constant moves the images by that constant; one
    differing only by a pattern finer than the factor (a checkerboard averages to 0 over every block) leaves them."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(low_pass(torch.full((1, 3, 8, 8), 0.3), 4), torch.full((1, 3, 8, 8), 0.3))
    assert torch.allclose(low_res_consistency(images, images + 0.25, 4), images + 0.25, atol=1e-6)
    rows, columns = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checkerboard = ((rows + columns) % 2 * 2 - 1).float()
    for factor in (2, 4):
        assert torch.allclose(low_res_consistency(images, images + 0.5 * checkerboard, factor), images, atol=1e-6)
    assert not torch.allclose(low_res_consistency(images, -images, 4), images, atol=0.1)


def _block_error(images: torch.Tensor, low_res: torch.Tensor) -> float:
    """Mean absolute difference between `images` and `low_res` `(1, 3, h, w)`, both averaged to `h x w` blocks."""
    factor = images.shape[-1] // low_res.shape[-1]
    return (F.avg_pool2d(images, factor) - low_res).abs().mean().item()


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("name", STAGE_II)
def test_low_res_consistency_holds_the_output_to_its_low_res_input(pipeline_components, name, scheduler):
    """With `low_res_consistency_factor=4` (x4: the low-res input's own scale) the tiny random UNet's output from a
    smooth input, which otherwise has nothing of it, averages over 4x4 blocks to the input within 0.04 (measured
    0.011-0.027; without: 0.31-0.52), with DDPM, DDIM and DPM-Solver (each diffuses the reference with its own
    `add_noise`); reproducible from the generator. Inpainting repaints the whole image here (the kept pixels would be
    the original image's). Euler-type schedulers are not in the list: this random UNet's samples diverge with them
    (|x| ~ 1e4), with or without the option."""
    pipeline = _pipeline(name, pipeline_components("II"))
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    corners = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(10)) * 2 - 1
    low_res = F.interpolate(corners, 8, mode="bilinear", align_corners=True)  # smooth, as images are at 8x8
    extra = {"image": low_res, **({"mask_image": torch.ones(1, 1, 32, 32)} if "Inpainting" in name else {})}
    held = _run(pipeline, name, low_res_consistency_factor=4, **extra)
    assert torch.equal(_run(pipeline, name, low_res_consistency_factor=4, **extra), held)
    free = _run(pipeline, name, **extra)
    errors = _block_error(held, low_res), _block_error(free, low_res)
    assert errors[0] < 0.04 < 0.25 < errors[1], errors
    assert (held - F.interpolate(low_res, 32, mode="bicubic")).abs().mean() > 0.1  # the UNet draws the detail


def test_low_res_consistency_late_factor_applies_to_the_steps_that_end_below_its_timestep():
    """`LowResConsistency.step_factors`: a step takes the late factor when the timestep it reaches (the next one, or
    clean images after the last) is below the late timestep; without a late factor, the factor at every step."""
    held = LowResConsistency(4, late_factor=2, late_timestep=300)
    assert held.step_factors(torch.tensor([999, 500, 300, 299, 0])) == [4, 4, 2, 2, 2]
    assert held.step_factors([999, 800]) == [4, 2]
    assert LowResConsistency(4).step_factors(torch.tensor([999, 500, 0])) == [4, 4, 4]


@pytest.mark.parametrize("name", STAGE_II)
def test_low_res_consistency_late_factor_changes_the_scale_of_the_late_steps(pipeline_components, name):
    """A late factor from timestep 999 (every step ends below it) gives the images of that factor throughout; one
    equal to the factor changes nothing; one from timestep 200 (8 steps, 875 to 0: the last 3 steps of every
    case, which runs 4 to 8) gives images unlike either factor's alone."""
    pipeline = _pipeline(name, pipeline_components("II"))
    extra = {"mask_image": torch.ones(1, 1, 32, 32)} if "Inpainting" in name else {}
    extra["num_inference_steps"] = 8
    held = {factor: _run(pipeline, name, low_res_consistency_factor=factor, **extra) for factor in (2, 4)}

    def late(factor: int, timestep: int) -> torch.Tensor:
        return _run(pipeline, name, low_res_consistency_factor=4, low_res_consistency_late_factor=factor,
                    low_res_consistency_late_timestep=timestep, **extra)  # fmt: skip

    assert torch.equal(late(2, 999), held[2])
    assert torch.equal(late(4, 500), held[4])
    switched = late(2, 200)
    assert min((switched - held[2]).abs().max(), (switched - held[4]).abs().max()) > 1e-3


def _original_default(module: str, argument: str):
    """A default of `embeddings_to_image` in `deepfloyd_if/modules/<module>.py`, read from the source (importing
    the module loads CLIP from the hub)."""
    tree = ast.parse((Path(deepfloyd_if.__file__).parent / "modules" / f"{module}.py").read_text())
    (function,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "embeddings_to_image"]
    arguments = function.args.args[-len(function.args.defaults) :] + function.args.kwonlyargs
    defaults = function.args.defaults + function.args.kw_defaults
    return next(ast.literal_eval(d) for a, d in zip(arguments, defaults) if a.arg == argument)


@pytest.mark.parametrize("stage, module, config", [("I", "stage_I", "base"), ("II", "stage_II", "super_res")])
def test_dynamic_thresholding_per_stage(converted, stage, module, config):
    """Dynamic thresholding as the original samples each stage (p = 0.95; c = 1.5 at stage I, 1.0 at stage II,
    read from `deepfloyd_if`'s defaults), in `denoising_scheduler(stage)` and in the converted folder's scheduler."""
    scheduler = denoising_scheduler(stage)
    assert scheduler.config.thresholding is True
    assert scheduler.config.dynamic_thresholding_ratio == _original_default(module, "dynamic_thresholding_p") == 0.95
    assert scheduler.config.sample_max_value == _original_default(module, "dynamic_thresholding_c")
    assert scheduler.config.sample_max_value == {"I": 1.5, "II": 1.0}[stage]
    saved = DDPMScheduler.from_pretrained(converted(config)[1], subfolder="scheduler")
    assert _settings(saved) == _settings(scheduler)


def test_cut_warning_names_only_the_words_cut(pipeline_components, caplog):
    """In a batch, the warning lists the words cut from each prompt that was cut, and nothing for a short prompt
    (no padding tokens)."""
    pipeline = _pipeline("IFPipeline", pipeline_components("I"))
    with caplog.at_level(logging.WARNING, logger="if_diffusers"):
        pipeline.encode_prompt(["a red circle on a blue background", "a"], max_sequence_length=4)
    (message,) = [r.message for r in caplog.records if "was cut at 4" in r.message]
    cut = message.split("Cut: ")[1]
    tokens = pipeline.tokenizer("a red circle on a blue background").input_ids
    assert cut == str([pipeline.tokenizer.decode(tokens[3:-1])]) and "<pad>" not in cut
