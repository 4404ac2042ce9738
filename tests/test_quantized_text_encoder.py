"""A quantized T5 (`if_diffusers.quantization`): diffusers' `PipelineQuantizationConfig` through our pipelines'
`from_pretrained`, `IFCascadePipeline.from_pretrained_stages` (named by the cascade's components: T5 loaded once,
quantized, stage III's CLIP not) and `--quantize-text-encoder` of `generate` and `batch`; T5 weights int8 with one
scale per row, its embeddings within a measured bound of float32's, generation end to end, one T5 forward per prompt
set and call; and every refusal, naming the option, the value and what is missing, before anything loads."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from diffusers import PipelineQuantizationConfig, StableDiffusionUpscalePipeline
from transformers import BitsAndBytesConfig, T5EncoderModel

from if_diffusers import IFCascadePipeline, IFPipeline, IFSuperResolutionPipeline, demo_cascade
from if_diffusers.cli import main
from if_diffusers.installed_versions import TRANSFORMERS_5
from if_diffusers.pipelines.stage_quantization import stage_quantization_configs
from if_diffusers.quantization import text_encoder_quantization, weight_bytes

PROMPTS = ["a red circle on a blue background", "a large yellow triangle in the middle"]
STEPS = dict(stage_1_num_inference_steps=1, stage_2_num_inference_steps=1, stage_3_num_inference_steps=1)
# int8 weight-only (one scale per row) moves the tiny T5's embeddings by 0.85-1.3% of their norm, measured on these
# prompts, four others and scripts/measure_quantized_text_encoder.py's random tokens (the same stored weights in
# bfloat16, weights and compute: 0.65-0.75%; float16: 0.06-0.09%; nf4: 11-17%). As expected: rounding to a step of
# max|row| / 127 is, for rows of 24-48 Gaussian weights (max|row| ~ 2.3 sigma), a relative error of
# 2.3 / 127 / sqrt(12) = 0.5% per matrix, about 1% through the 14 matrices of 2 layers.
INT8_ERROR_BOUND = 0.03  # 2.3x the largest measured; nf4's errors are 4-6x over it
QUANTIZED_ERROR_FLOOR = 3e-3  # 3.5x float16's largest, 2.8x under int8's smallest: T5 was quantized


@pytest.fixture(scope="module")
def int8() -> PipelineQuantizationConfig:
    return text_encoder_quantization("int8")  # torchao is in the test extra


@pytest.fixture(scope="module")
def int8_cascade(cascade_folder, int8) -> IFCascadePipeline:
    """The tests' saved cascade (stages I, II and the x4 upscaler) loaded with T5 in int8."""
    pipeline = IFCascadePipeline.from_pretrained(cascade_folder, quantization_config=int8)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def stage_folders(pipeline_components, tiny_upscaler, tmp_path_factory):
    """Stage I, stage II (each with the tiny T5, as DeepFloyd's repos) and the tiny x4 upscaler, saved."""
    root = tmp_path_factory.mktemp("stages")
    stages = (IFPipeline(**pipeline_components("I")), IFSuperResolutionPipeline(**pipeline_components("II")),
              StableDiffusionUpscalePipeline(**tiny_upscaler))  # fmt: skip
    for name, stage in zip(("stage_1", "stage_2", "stage_3"), stages):
        stage.save_pretrained(root / name)
    return {name: root / name for name in ("stage_1", "stage_2", "stage_3")}


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)]


def _int8_linears(t5: torch.nn.Module) -> list[torch.nn.Module]:
    """The linear layers int8 quantizes: all of them, but T5's feed-forward outputs (`wo`) under transformers 4,
    which keeps T5's `_keep_in_fp32_modules` out of torchao's quantization (5 no longer does; bitsandbytes: both)."""
    kept = () if TRANSFORMERS_5 else tuple(t5._keep_in_fp32_modules or ())
    return [m for name, m in t5.named_modules() if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in kept]


def _is_int8(weight: torch.Tensor) -> bool:
    """A torchao int8 tensor: int8 data of the weight's shape, one scale per output row."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    return (qdata is not None and qdata.dtype == torch.int8 and qdata.shape == weight.shape
            and scale.numel() == weight.shape[0])  # fmt: skip


def _plain(model: torch.nn.Module) -> bool:
    return all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.parameters())


def _embeddings(tokenizer, text_encoder, prompts=PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's embeddings of `prompts` at IF's 77 tokens, and the mask of their real tokens."""
    tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return states, tokens.attention_mask.bool()


# --- through from_pretrained -------------------------------------------------------------------------------------


def test_int8_quantizes_every_linear_of_t5_and_nothing_else(int8_cascade, tiny_text):
    """diffusers' own loader takes the config: T5's linear layers hold int8 weights with a scale per row (about a
    quarter of their float32 bytes), its embedding and norms stay float, the other models are untouched."""
    pipeline = int8_cascade
    linears = _int8_linears(pipeline.text_encoder)
    assert len(linears) == (14 if TRANSFORMERS_5 else 12) and all(_is_int8(linear.weight) for linear in linears)
    quantized = sum(weight_bytes(linear) for linear in linears)
    weights = sum(linear.weight.numel() for linear in linears)
    assert weights <= quantized <= weights * 1.25  # one byte a weight, and each row's scale
    assert weight_bytes(pipeline.text_encoder) < 0.5 * weight_bytes(tiny_text[1])
    assert type(pipeline.text_encoder.shared.weight) is torch.nn.Parameter
    assert _plain(pipeline.stage_1_unet) and _plain(pipeline.stage_2_unet) and _plain(pipeline.stage_3_text_encoder)


def test_int8_embeddings_are_within_the_measured_bound_of_float32(int8_cascade, tiny_text):
    tokenizer, reference = tiny_text
    quantized, mask = _embeddings(tokenizer, int8_cascade.text_encoder)
    exact, _ = _embeddings(tokenizer, reference)
    error = float((quantized - exact)[mask].norm() / exact[mask].norm())
    assert QUANTIZED_ERROR_FLOOR < error < INT8_ERROR_BOUND, error


def test_the_int8_cascade_generates_end_to_end_with_one_t5_forward_per_prompt_set(int8_cascade):
    calls = []
    hook = int8_cascade.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        images = int8_cascade(PROMPTS, height=8, width=8, output_type="pt", **STEPS).images
    finally:
        hook.remove()
    assert images.shape == (2, 3, 128, 128) and torch.isfinite(images).all()
    assert len(calls) == 2  # the prompts, and the empty negative prompts: each once, shared by stages I and II


# --- through from_pretrained_stages ------------------------------------------------------------------------------


def test_from_pretrained_stages_loads_t5_once_quantized_and_not_stage_3s_clip(stage_folders, int8, monkeypatch):
    loads = []
    original = T5EncoderModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(kwargs.get("quantization_config"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(counting))
    pipeline = IFCascadePipeline.from_pretrained_stages(**stage_folders, quantization_config=int8)
    assert len(loads) == 1 and loads[0] is int8.quant_mapping["text_encoder"]
    assert all(_is_int8(linear.weight) for linear in _int8_linears(pipeline.text_encoder))
    assert _plain(pipeline.stage_3_text_encoder)  # CLIP: stage III's pipeline also names it text_encoder
    both = PipelineQuantizationConfig(quant_mapping={**int8.quant_mapping,
                                                     "stage_3_text_encoder": int8.quant_mapping["text_encoder"]})  # fmt: skip
    pipeline = IFCascadePipeline.from_pretrained_stages(**stage_folders, quantization_config=both)
    assert all(_is_int8(linear.weight) for linear in _linears(pipeline.stage_3_text_encoder))


def test_a_cascade_config_is_split_into_each_stages_own_names():
    stages = ("stage_1", "stage_2", "stage_3")
    every = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": True})
    named = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": True},
                                       components_to_quantize=["text_encoder", "stage_2_unet", "stage_3_vae"])  # fmt: skip
    config = BitsAndBytesConfig(load_in_4bit=True)
    mapped = PipelineQuantizationConfig(quant_mapping={"stage_1_unet": config, "stage_3_text_encoder": config})
    assert stage_quantization_configs(None, stages) == {"stage_1": {}, "stage_2": {}, "stage_3": {}}
    split = stage_quantization_configs(every, stages)
    assert all(split[s]["quantization_config"].components_to_quantize is None for s in stages)
    split = stage_quantization_configs(named, stages)
    assert [split[s]["quantization_config"].components_to_quantize for s in stages] == [["text_encoder"], ["unet"],
                                                                                        ["vae"]]  # fmt: skip
    split = stage_quantization_configs(mapped, stages)
    assert split["stage_2"] == {} and split["stage_1"]["quantization_config"].quant_mapping == {"unet": config}
    assert split["stage_3"]["quantization_config"].quant_mapping == {"text_encoder": config}


@pytest.mark.parametrize(
    "config, stages, error, message",
    [
        ({"text_encoder": "int8"}, ("stage_1", "stage_2"), TypeError,
         r"quantization_config is a dict; expected diffusers' PipelineQuantizationConfig"),
        (["unet"], ("stage_1", "stage_2", "stage_3"), ValueError,
         r"quantization_config names \['unet'\], not models of this cascade; expected .*'stage_1_unet'"),
        (["stage_3_unet"], ("stage_1", "stage_2"), ValueError, r"names \['stage_3_unet'\], not models of this cascade"),
    ],
)  # fmt: skip
def test_from_pretrained_stages_refuses_a_config_it_cannot_split_before_reading_a_stage(config, stages, error,
                                                                                        message):  # fmt: skip
    if isinstance(config, list):
        config = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": True},
                                            components_to_quantize=config)  # fmt: skip
    with pytest.raises(error, match=message):  # the stage paths do not exist: nothing was read
        IFCascadePipeline.from_pretrained_stages("no/such/stage_1", "no/such/stage_2",
                                                 "no/such/stage_3" if len(stages) == 3 else None,
                                                 quantization_config=config)  # fmt: skip


# --- the command line --------------------------------------------------------------------------------------------


def test_generate_quantize_text_encoder_int8_writes_the_image(cascade_folder, int8, tmp_path, monkeypatch):
    seen = []
    original = IFCascadePipeline.__call__

    def recording(self, *args, **kwargs):
        seen.append(all(_is_int8(linear.weight) for linear in _int8_linears(self.text_encoder)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IFCascadePipeline, "__call__", recording)
    out = tmp_path / "out.png"
    assert main(["generate", PROMPTS[0], "-o", str(out), "--model", str(cascade_folder), "--device", "cpu",
                 "--steps", "1", "--quantize-text-encoder", "int8"]) == 0  # fmt: skip
    assert seen == [True] and out.is_file()


def _record_loading(monkeypatch) -> list[dict]:
    """Every loader `generate` and `batch` use records its keyword arguments and stops there (exit 1)."""
    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise ValueError("recorded")

    for cls, name in ((IFCascadePipeline, "from_pretrained"), (IFCascadePipeline, "from_pretrained_stages"),
                      (demo_cascade, "load_demo_cascade")):  # fmt: skip
        monkeypatch.setattr(cls, name, record)
    return calls


@pytest.mark.parametrize(
    "command",
    [["generate", "a red circle", "-o", "{tmp}/o.png"],
     ["generate", "a red circle", "-o", "{tmp}/o.png", "--model", "{folder}"],
     ["generate", "a red circle", "-o", "{tmp}/o.png", "--model", "{folder}", "--stage-2", "{folder}"],
     ["batch", "{tmp}/prompts.txt", "-o", "{tmp}/dataset", "--model", "{folder}"]],
)  # fmt: skip
def test_every_loading_path_of_generate_and_batch_gets_the_config(cascade_folder, int8, tmp_path, monkeypatch,
                                                                 command):  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    calls = _record_loading(monkeypatch)
    arguments = [a.format(tmp=tmp_path, folder=cascade_folder) for a in command]
    assert main([*arguments, "--device", "cpu", "--quantize-text-encoder", "int8"]) == 1
    config = calls[0]["quantization_config"]
    assert isinstance(config, PipelineQuantizationConfig) and list(config.quant_mapping) == ["text_encoder"]
    assert type(config.quant_mapping["text_encoder"]).__name__ == "TorchAoConfig"


def test_an_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--quantize-text-encoder", "int4"])
    assert exit_.value.code == 2
    assert "argument --quantize-text-encoder: invalid choice: 'int4' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, missing, message",
    [("int8", "torchao", r"--quantize-text-encoder int8 \(torchao's int8 weight-only\) needs torchao >= 0\.17 "
                         r"\(not installed\): pip install 'if-diffusers\[quantization\]'"),
     ("nf4", "bitsandbytes", r"--quantize-text-encoder nf4 \(bitsandbytes' 4-bit NormalFloat\) needs bitsandbytes "
                             r">= 0\.46\.1 \(not installed\): pip install 'bitsandbytes>=0\.46\.1'")],
)  # fmt: skip
def test_a_missing_backend_is_one_line_before_anything_loads(cascade_folder, tmp_path, capsys, monkeypatch, method,
                                                             missing, message):  # fmt: skip
    monkeypatch.setitem(sys.modules, missing, None)  # import fails, as without the package
    calls = _record_loading(monkeypatch)
    code = main(["generate", "a red circle", "-o", str(tmp_path / "o.png"), "--model", str(cascade_folder),
                 "--device", "cpu", "--quantize-text-encoder", method])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and calls == [] and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_the_batch_metadata_records_the_quantization(cascade_folder, int8, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    out = tmp_path / "dataset"
    assert main(["batch", str(tmp_path / "prompts.txt"), "-o", str(out), "--model", str(cascade_folder), "--device",
                 "cpu", "--steps", "1", "--quantize-text-encoder", "int8"]) == 0  # fmt: skip
    row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert row["quantize_text_encoder"] == "int8"


def test_a_diffusers_that_cannot_import_beside_torchao_is_named(monkeypatch):
    """diffusers 0.35 and 0.36 fail to import their torchao quantizer beside torchao >= 0.17 (NameError: a logger
    used before its definition), and with it every model: `import if_diffusers` says so, with the fix."""
    import importlib

    from if_diffusers import quantization

    original = importlib.import_module

    def failing(name, *args):
        if name == "diffusers.quantizers.torchao.torchao_quantizer":
            raise NameError("name 'logger' is not defined")
        return original(name, *args)

    monkeypatch.setattr(importlib, "import_module", failing)
    with pytest.raises(ImportError, match=r"diffusers \S+ cannot import its models beside torchao \S+ \(its torchao "
                                          r"quantizer fails: name 'logger' is not defined; fixed in diffusers 0\.37\): "
                                          r"pip install 'diffusers>=0\.37', or uninstall torchao"):  # fmt: skip
        quantization._import_torchao_quietly()
