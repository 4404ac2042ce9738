"""torch.compile: every IF UNet class traces as one graph (our attention processors and SDPA, LoRA, the
super-resolution noise-level input); whole cascade calls in each mode compile once per UNet and never again for
another prompt or seed, once more at most for another batch size or resolution; `enable_compile()` with inductor
equals the eager pipeline, is reversible, and refuses what cannot work.

Graph counts use dynamo's `CompileCounter` backend (tracing without code generation); one test runs inductor, on
minimal UNets (inductor's cold start on this CPU is about 25 s per UNet)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import ORIGINAL_BASE, load_script, tiny_unet
from diffusers import StableDiffusionUpscalePipeline
from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnAddedKVProcessor2_0
from peft import LoraConfig
from torch._dynamo.testing import CompileCounter

from if_diffusers import (
    IFCascadePipeline,
    IFImg2ImgPipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
    IFSuperResUNet2DConditionModel,
    IFUNet2DConditionModel,
)
from if_diffusers.models.original_params import OriginalUNetParams
from if_diffusers.scheduling import denoising_scheduler, noising_scheduler

PROMPT = "a red circle"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from empty dynamo caches (their entries count towards one recompile limit) and leaves the
    limits as it found them."""
    limits = (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = limits


def _text(batch: int, width: int = 24, length: int = 7) -> torch.Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(1))


def _stage_1_call(unet):
    return dict(sample=torch.randn(2, 3, 16, 16), timestep=torch.tensor(10), encoder_hidden_states=_text(2))


def _super_res_call(unet):
    return dict(sample=torch.randn(2, 6, 32, 32), timestep=torch.tensor(10), encoder_hidden_states=_text(2),
                class_labels=torch.tensor([100, 250]), added_cond_kwargs={"text_embeds": _text(2, length=5)})  # fmt: skip


def _low_res_call(unet):
    return dict(sample=torch.randn(2, 3, 32, 32), timestep=torch.tensor(10), encoder_hidden_states=_text(2),
                low_res_image=torch.rand(2, 3, 8, 8) * 2 - 1, noise_level=torch.tensor([100, 250]),
                augmentation_noise=torch.randn(2, 3, 32, 32))  # fmt: skip


def _reference_attention(unet):
    unet.set_default_attn_processor()
    assert {type(p) for p in unet.attn_processors.values()} == {AttnAddedKVProcessor}
    return unet


def _with_lora(unet):
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "to_out.0"]))  # fmt: skip
    return unet


UNET_CASES = {
    "stage_I_sdpa": ("I", lambda unet: unet, _stage_1_call, {}),
    "stage_I_reference_attention": ("I", _reference_attention, _stage_1_call, {}),
    "stage_I_lora_scaled": ("I", _with_lora, _stage_1_call, {"cross_attention_kwargs": {"scale": 0.5}}),
    "super_res_stock_call_pooled_text": ("II", lambda unet: unet, _super_res_call, {}),
    "super_res_low_res_input": ("II", lambda unet: unet, _low_res_call, {}),
}


@pytest.mark.parametrize("case", UNET_CASES)
def test_each_unet_traces_as_one_graph(case):
    stage, prepare, inputs, extra = UNET_CASES[case]
    unet = prepare(tiny_unet(stage).eval())
    if case == "stage_I_sdpa":
        assert {type(p) for p in unet.attn_processors.values()} == {AttnAddedKVProcessor2_0}
    call = {**inputs(unet), **extra}
    counter = CompileCounter()
    compiled = torch.compile(unet, backend=counter, fullgraph=True)  # a graph break raises
    with torch.no_grad():
        expected = unet(**call).sample
        torch.testing.assert_close(compiled(**call).sample, expected, rtol=0, atol=1e-6)
        compiled(**{**call, "timestep": torch.tensor(500)})
    assert counter.frame_count == 1


# --- whole cascade calls ------------------------------------------------------------------------------------------


def _minimal_unet(cls, in_channels: int):
    """An IF UNet of one level, with the middle block's attention only: the fewest operators to trace (and inductor
    compiles it in about 25 s here, against about 60 s for the two-level tiny UNets)."""
    params = {**ORIGINAL_BASE, "image_size": 16 if in_channels == 3 else 32, "channel_mult": "1",
              "attention_resolutions": "1", "in_channels": in_channels}  # fmt: skip
    torch.manual_seed(0)
    return cls.from_config(OriginalUNetParams.parse(params).to_unet_config())


def _text_components(tiny_text) -> dict:
    tokenizer, text_encoder = tiny_text
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, safety_checker=None, feature_extractor=None,
                watermarker=None, requires_safety_checker=False)  # fmt: skip


def _minimal_stage_1(tiny_text) -> IFPipeline:
    pipe = IFPipeline(unet=_minimal_unet(IFUNet2DConditionModel, 3), scheduler=denoising_scheduler("I"),
                      **_text_components(tiny_text))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _minimal_cascade(tiny_text, tiny_upscaler=None) -> IFCascadePipeline:
    """A cascade of minimal UNets of its own (compiling changes them in place), with stage III when `tiny_upscaler`
    is given (a copy of its UNet)."""
    common = _text_components(tiny_text)
    stage_1 = _minimal_stage_1(tiny_text)
    stage_2 = IFSuperResolutionPipeline(unet=_minimal_unet(IFSuperResUNet2DConditionModel, 6),
                                        scheduler=denoising_scheduler("II"), image_noising_scheduler=noising_scheduler(),
                                        **common)  # fmt: skip
    stage_3 = None
    if tiny_upscaler is not None:
        stage_3 = StableDiffusionUpscalePipeline(**{**tiny_upscaler, "unet": copy.deepcopy(tiny_upscaler["unet"])})
    cascade = IFCascadePipeline.from_stages(stage_1, stage_2, stage_3)
    cascade.set_progress_bar_config(disable=True)
    return cascade


STEPS = dict(stage_1_num_inference_steps=2, stage_2_num_inference_steps=2, stage_3_num_inference_steps=2)
MODE_CALLS = {
    "img2img": {"image": torch.rand(1, 3, 16, 16) * 2 - 1},
    "inpaint": {"image": torch.rand(1, 3, 16, 16) * 2 - 1, "mask_image": torch.ones(1, 1, 16, 16)},
}


@pytest.mark.parametrize("mode", MODE_CALLS)
def test_a_second_cascade_call_with_another_prompt_and_seed_compiles_nothing(tiny_text, tiny_upscaler, mode):
    """img2img with stage III (the x4 upscaler's stock UNet is compiled too), inpainting without; text-to-image is
    the next test's first two calls."""
    cascade = _minimal_cascade(tiny_text, tiny_upscaler if mode == "img2img" else None)
    counter = CompileCounter()
    cascade.enable_compile(backend=counter)
    call = dict(MODE_CALLS[mode], output_type="pt", **STEPS)
    cascade(PROMPT, generator=torch.Generator().manual_seed(0), **call)
    unets = 3 if mode == "img2img" else 2
    assert counter.frame_count == unets
    cascade("a small green square", generator=torch.Generator().manual_seed(1), **call)
    assert counter.frame_count == unets
    cascade.disable_compile()  # every UNet eager again, in its own layout
    assert not cascade.is_compiled
    every_unet = [cascade.stage_1_unet, cascade.stage_2_unet] + ([cascade.stage_3_unet] if mode == "img2img" else [])
    assert all(unet._compiled_call_impl is None and unet.conv_in.weight.is_contiguous() for unet in every_unet)


def test_text_to_image_recompiles_once_per_unet_for_another_batch_size_or_resolution(tiny_text):
    cascade = _minimal_cascade(tiny_text)
    counter = CompileCounter()
    cascade.enable_compile(backend=counter)
    frames = []
    for call in (dict(prompt=PROMPT, generator=torch.Generator().manual_seed(0)),
                 dict(prompt="a small green square", generator=torch.Generator().manual_seed(1)),
                 dict(prompt=PROMPT, num_images_per_prompt=2, height=8, width=8),
                 dict(prompt=PROMPT, num_images_per_prompt=3, height=24, width=32)):  # fmt: skip
        cascade(output_type="pt", **STEPS, **call)
        frames.append(counter.frame_count)
    # 16x16, batch 1: two UNets compile; another prompt and seed: nothing; batch 2 at 8x8: each once more (dynamic
    # batch, height and width); batch 3 at 24x32: nothing
    assert frames == [2, 2, 4, 4]


# --- enable_compile -----------------------------------------------------------------------------------------------


def test_enable_compile_with_inductor_equals_eager_and_is_reversible(tiny_text):
    """Inductor on stage I's minimal UNet (each UNet costs about 25 s of cold compile here; the super-resolution
    class traces as one graph above, and the cascade's bookkeeping is checked with the counting backend)."""
    pipe = _minimal_stage_1(tiny_text)

    def run(prompt, seed):
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", num_inference_steps=2)

    eager = run(PROMPT, 0).images
    # the warm-up (the same batch and size, another prompt) compiles; the calls after it compile nothing
    pipe.enable_compile(warmup={"prompt": "a warm-up", "num_inference_steps": 2})
    assert pipe.is_compiled and pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(PROMPT, 0).images
        run("a small green square", 1)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    pipe.disable_compile()
    assert not pipe.is_compiled and pipe.unet._compiled_call_impl is None and pipe.unet.conv_in.weight.is_contiguous()
    assert torch.equal(run(PROMPT, 0).images, eager)


def _stage_1(pipeline_components):
    pipe = IFPipeline(**{**pipeline_components("I"), "unet": tiny_unet("I")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_failed_warmup_leaves_the_pipeline_eager(pipeline_components):
    pipe = _stage_1(pipeline_components)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        pipe.enable_compile(backend=CompileCounter(), warmup={"prompt": PROMPT, "num_inference_steps": 0})
    assert not pipe.is_compiled and pipe.unet.conv_in.weight.is_contiguous()


def test_regional_compilation_compiles_the_blocks_and_equals_eager(pipeline_components):
    pipe = _stage_1(pipeline_components)
    expected = pipe(PROMPT, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    counter = CompileCounter()
    pipe.enable_compile(regional=True, backend=counter)
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in ("ResnetBlock2D", "Attention")]
    assert all(m._compiled_call_impl is not None for m in blocks) and pipe.unet._compiled_call_impl is None
    images = pipe(PROMPT, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    # channels_last convolutions round differently: float32 tolerance
    torch.testing.assert_close(images.images, expected.images, rtol=0, atol=1e-4)
    frames = counter.frame_count
    assert 1 < frames <= len(blocks)  # each distinct block once
    pipe("a small green square", num_inference_steps=3, output_type="pt")
    assert counter.frame_count == frames
    assert torch._dynamo.config.recompile_limit >= 4 * len(blocks)
    pipe.disable_compile()
    assert all(m._compiled_call_impl is None for m in blocks) and not pipe.is_compiled
    assert torch._dynamo.config.recompile_limit >= 4 * len(blocks)  # never lowered: the cached entries still count


def test_pipelines_sharing_a_unet_share_its_compilation(pipeline_components):
    pipe = _stage_1(pipeline_components)
    pipe.enable_compile(backend=CompileCounter())
    sibling = IFImg2ImgPipeline(**pipe.components)
    assert sibling.is_compiled
    with pytest.raises(ValueError, match=r"after enable_compile\(regional=False\) \(unet compiled whole\)"):
        sibling.enable_model_cpu_offload(device="cpu")
    sibling.disable_compile()
    assert not pipe.is_compiled and pipe.unet.conv_in.weight.is_contiguous()


def test_compilation_and_offload_combine_only_where_they_work(pipeline_components):
    pipe = _stage_1(pipeline_components)
    pipe.enable_compile(backend=CompileCounter())
    with pytest.raises(ValueError, match=r"enable_model_cpu_offload\(\) after enable_compile\(regional=False\)"):
        pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match=r"enable_sequential_cpu_offload\(\) after enable_compile\(\)"):
        pipe.enable_sequential_cpu_offload(device="cpu")
    pipe.disable_compile()
    try:
        pipe.enable_sequential_cpu_offload(device="cpu")
        with pytest.raises(ValueError, match=r"unet has per-layer offload hooks \(enable_sequential_cpu_offload\)"):
            pipe.enable_compile(regional=True, backend=CompileCounter())
    finally:
        pipe.remove_all_hooks()
    try:
        pipe.enable_model_cpu_offload(device="cpu")
        with pytest.raises(ValueError, match="unet has the model CPU offload hook.*pass regional=True"):
            pipe.enable_compile(backend=CompileCounter())
        counter = CompileCounter()
        pipe.enable_compile(regional=True, backend=counter)  # the hook stays outside the compiled blocks
        pipe(PROMPT, num_inference_steps=2, output_type="pt")
        assert counter.frame_count > 1
    finally:
        pipe.remove_all_hooks()  # the text encoder is the session's


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(mode="fast"), r"mode='fast': expected one of \('default', 'reduce-overhead'"),
        (dict(regional="yes"), r"regional='yes': expected True or False"),
        (dict(channels_last=None), r"channels_last=None: expected True or False"),
        (dict(fullgraph=1), r"fullgraph=1: expected True or False"),
        (dict(dynamic="auto"), r"dynamic='auto': expected None, True or False"),
        (dict(backend="tensorrt"), r"backend='tensorrt': expected a torch.compile backend, one of \["),
        (dict(backend=3), r"backend=3: expected a backend name or a callable backend"),
        (dict(warmup="a prompt"), r"warmup='a prompt': expected a dict of pipeline call arguments"),
        (dict(mode="max-autotune", backend="eager"), r"mode='max-autotune' with backend='eager': modes other than"),
    ],
)
def test_enable_compile_checks_its_arguments_before_compiling(pipeline_components, arguments, message):
    pipe = _stage_1(pipeline_components)
    with pytest.raises(ValueError, match=message):
        pipe.enable_compile(**arguments)
    assert not pipe.is_compiled and pipe.unet._compiled_call_impl is None


def test_a_compiled_pipeline_saves_the_stock_weights(pipeline_components, tmp_path):
    pipe = _stage_1(pipeline_components)
    pipe.enable_compile(backend=CompileCounter())
    pipe.save_pretrained(tmp_path / "saved")
    loaded = IFPipeline.from_pretrained(tmp_path / "saved")
    assert not loaded.is_compiled
    assert loaded.unet.state_dict().keys() == pipe.unet.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), pipe.unet.state_dict().values()))


# --- scripts/benchmark.py ---------------------------------------------------------------------------------------


@pytest.fixture
def benchmark_script(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # what the script sets for itself, undone after
    return load_script("benchmark")


def test_the_benchmark_runs_end_to_end_on_the_cpu(benchmark_script, capsys):
    """A smoke run: the tiny UNets, 1 step a stage, dynamo's eager backend (no code generation); every stage and
    variant gets its row, and the total its ratios."""
    assert benchmark_script.main(["--model", "tiny", "--repeats", "1", "--backend", "eager", "--stage-1-timesteps",
                                  "1", "--stage-2-timesteps", "1", "--peak-tflops", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines()]
    for stage in ("I", "II"):
        for variant in ("diffusers", "diffusers compiled", "ours", "ours enable_compile"):
            assert any(row[:1] == [stage] and " ".join(row[1:]).startswith(variant + " ") for row in rows), variant
    assert "FLOP floor at 1 TFLOP/s" in printed
    assert re.search(r"ours enable_compile: [\d.]+x diffusers, [\d.]+x diffusers compiled, [\d.]+x ours eager",
                     printed)  # fmt: skip


def test_the_benchmark_names_a_device_this_machine_lacks(benchmark_script, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
