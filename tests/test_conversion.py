"""The conversion script: the hub layout it writes, what it includes, and every bad input it must refuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ORIGINAL_BASE, STAGE_II_CONFIGS, load_script, original_unet
from diffusers import DDPMScheduler, DiffusionPipeline
from safetensors.torch import load_file

from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.conversion import ConversionError, convert_original_checkpoint, write_checkpoint
from if_diffusers.conversion.command_line import main as convert_main
from if_diffusers.conversion.oracle import relative_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def original_base():
    return original_unet(ORIGINAL_BASE, seed=11)


@pytest.fixture
def checkpoint(tmp_path, original_base):
    return write_checkpoint(tmp_path / "IF-I-tiny", ORIGINAL_BASE, original_base.state_dict())


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --- what a conversion writes --------------------------------------------------------------------------------


def test_stage_1_hub_layout(checkpoint, tmp_path):
    output = convert_original_checkpoint(checkpoint, tmp_path / "out")
    index = json.loads((output / "model_index.json").read_text())
    assert index["_class_name"] == ["if_diffusers_pipeline", "IFPipeline"]
    assert index["unet"] == ["if_diffusers_model", "IFUNet2DConditionModel"]  # with unet/if_diffusers_model.py
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert sorted(p.name for p in (output / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "if_diffusers_model.py",
    ]
    scheduler = DDPMScheduler.from_pretrained(output / "scheduler").config
    assert (scheduler.beta_schedule, scheduler.variance_type, scheduler.thresholding) == (
        "squaredcos_cap_v2",
        "learned_range",
        True,
    )
    assert (scheduler.dynamic_thresholding_ratio, scheduler.sample_max_value) == (0.95, 1.5)
    assert not (output / "image_noising_scheduler").exists() and _leftovers(tmp_path) == []


def test_stage_2_hub_layout(tmp_path):
    params = STAGE_II_CONFIGS["super_res"]
    source = write_checkpoint(tmp_path / "IF-II-tiny", params, original_unet(params).state_dict())
    output = convert_original_checkpoint(source, tmp_path / "out")
    index = json.loads((output / "model_index.json").read_text())
    assert index["_class_name"] == ["if_diffusers_pipeline", "IFSuperResolutionPipeline"]
    assert index["unet"] == ["if_diffusers_model", "IFSuperResUNet2DConditionModel"]
    assert DDPMScheduler.from_pretrained(output / "scheduler").config.sample_max_value == 1.0
    pipeline = DiffusionPipeline.from_pretrained(output, trust_remote_code=True)  # diffusers' loader, the folder alone
    assert type(pipeline.unet) is IFSuperResUNet2DConditionModel
    assert torch.equal(
        pipeline.image_noising_scheduler.alphas_cumprod, pipeline.unet.noise_augmentation_alphas_cumprod
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_half_precision_sources_convert_exactly(tmp_path, original_base, dtype, weights_format):
    half = {k: v.to(dtype) for k, v in original_base.state_dict().items()}
    source = write_checkpoint(tmp_path / "src", ORIGINAL_BASE, half, weights_format)
    unet = IFUNet2DConditionModel.from_pretrained(convert_original_checkpoint(source, tmp_path / "out") / "unet")
    assert next(unet.parameters()).dtype == torch.float32
    reference = original_unet(ORIGINAL_BASE)
    reference.load_state_dict({k: v.float() for k, v in half.items()})
    x, text = torch.randn(1, 3, 16, 16), torch.randn(1, 5, 24)
    with torch.no_grad():
        assert relative_error(unet(x, 7, text).sample, reference(x, torch.tensor([7]), text_emb=text)) < 1e-5


def test_fp16_variant(checkpoint, tmp_path):
    output = convert_original_checkpoint(checkpoint, tmp_path / "out", variant="fp16")
    full = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    half = load_file(output / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert full.keys() == half.keys() and all(half[k].dtype == torch.float16 for k in half)
    assert all(torch.equal(full[k].half(), half[k]) for k in full)
    assert (
        IFUNet2DConditionModel.from_pretrained(output / "unet", variant="fp16", torch_dtype=torch.float16).dtype
        == torch.float16
    )


def test_sharded_weights_load(checkpoint, tmp_path):
    output = convert_original_checkpoint(checkpoint, tmp_path / "out", max_shard_size="100KB")
    assert (output / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    IFUNet2DConditionModel.from_pretrained(output / "unet")


def test_text_encoder_and_tokenizer_are_included(checkpoint, tmp_path, tiny_t5_folder, tiny_tokenizer_folder):
    from transformers import T5EncoderModel

    from if_diffusers.installed_versions import t5_tokenizer_class

    output = convert_original_checkpoint(checkpoint, tmp_path / "out", text_encoder=tiny_t5_folder,
                                         tokenizer=tiny_tokenizer_folder)  # fmt: skip
    index = json.loads((output / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and index["tokenizer"][0] == "transformers"
    encoder, source = (
        T5EncoderModel.from_pretrained(output / "text_encoder"),
        T5EncoderModel.from_pretrained(tiny_t5_folder),
    )
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), source.state_dict().values()))
    tokenizer, source_tokenizer = (
        t5_tokenizer_class(folder).from_pretrained(folder) for folder in (output / "tokenizer", tiny_tokenizer_folder)
    )
    assert tokenizer("a red circle").input_ids == source_tokenizer("a red circle").input_ids


def test_overwrite_replaces_an_existing_folder(checkpoint, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    convert_original_checkpoint(checkpoint, output, overwrite=True)
    assert not (output / "stale.txt").exists() and (output / "unet").is_dir() and _leftovers(tmp_path) == []


def test_an_existing_empty_folder_is_used(checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    assert (convert_original_checkpoint(checkpoint, tmp_path / "out") / "model_index.json").is_file()


# --- bad input: each error names the file or argument and what was expected -----------------------------------


def _expect_error(checkpoint, output, message, **kwargs):
    with pytest.raises(ConversionError, match=message):
        convert_original_checkpoint(checkpoint, output, **kwargs)
    assert not output.exists() and _leftovers(output.parent) == []  # a failed conversion writes nothing


def test_missing_config(checkpoint, tmp_path):
    (checkpoint / "config.yml").unlink()
    _expect_error(checkpoint, tmp_path / "out", r"config.yml: missing; expected DeepFloyd's config.yml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("params: [unclosed", "config.yml: not valid YAML"),
        ("model: {}", "config.yml: expected a mapping with a 'params:' block"),
        ("params:\n  image_size: 64", r"params is missing \['in_channels'"),
    ],
)
def test_malformed_config(checkpoint, tmp_path, text, message):
    (checkpoint / "config.yml").write_text(text)
    _expect_error(checkpoint, tmp_path / "out", message)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"activation": "gelu_jit"},
            r"params.activation='gelu_jit' is not supported: expected one of \('gelu', 'silu'\)",
        ),
        ({"resblock_updown": False}, "params.resblock_updown=False is not supported"),
        ({"channel_mult": "2,4"}, "params.channel_mult starts with 2"),
        ({"attention_resolutions": "eight"}, r"params.attention_resolutions='eight': expected a comma-separated"),
        ({"num_res_blocks": [1, 2, 3]}, "expected one entry per channel_mult level"),
        (
            {"use_checkpoint": True},
            r"params has keys \['use_checkpoint'\] that deepfloyd_if.model.UNetModel does not take",
        ),
    ],
)
def test_unsupported_params(checkpoint, tmp_path, change, message):
    (checkpoint / "config.yml").write_text(yaml.safe_dump({"params": {**ORIGINAL_BASE, **change}}))
    _expect_error(checkpoint, tmp_path / "out", message)


def test_unknown_stage(checkpoint, tmp_path):
    (checkpoint / "config.yml").write_text(yaml.safe_dump({"params": {**ORIGINAL_BASE, "in_channels": 4}}))
    _expect_error(checkpoint, tmp_path / "out", r"params.in_channels=4 is no known stage: expected 3 \(stage I\) or 6")
    _expect_error(checkpoint, tmp_path / "out", r"stage='III': expected one of \('I', 'II'\)", stage="III")


def test_stage_override_must_match_the_config(checkpoint, tmp_path):
    _expect_error(checkpoint, tmp_path / "out", "stage='II' but .*config.yml describes a stage-I UNet", stage="II")


def test_weights_of_the_other_stage(checkpoint, tmp_path):
    params = STAGE_II_CONFIGS["super_res_plain"]
    write_checkpoint(checkpoint, params, original_unet(params).state_dict())
    (checkpoint / "config.yml").write_text(yaml.safe_dump({"params": {**params, "in_channels": 3}}))
    _expect_error(checkpoint, tmp_path / "out", r"pytorch_model.bin: has the noise-augmentation embedding aug_proj")


def test_missing_weights(checkpoint, tmp_path):
    (checkpoint / "pytorch_model.bin").unlink()
    _expect_error(checkpoint, tmp_path / "out", "no weights; expected one of model.safetensors, pytorch_model.bin")


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_truncated_weights(tmp_path, original_base, weights_format):
    source = write_checkpoint(tmp_path / "src", ORIGINAL_BASE, original_base.state_dict(), weights_format)
    path = next(p for p in source.iterdir() if p.name != "config.yml")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _expect_error(source, tmp_path / "out", rf"{path.name}: cannot be read as a state dict, truncated or corrupt")


def test_weights_that_are_not_a_state_dict(checkpoint, tmp_path):
    torch.save([torch.zeros(1)], checkpoint / "pytorch_model.bin")
    _expect_error(checkpoint, tmp_path / "out", "pytorch_model.bin: expected a flat mapping of parameter names")


def test_missing_and_extra_keys_are_named(checkpoint, tmp_path, original_base):
    state = original_base.state_dict()
    del state["input_blocks.2.0.emb_layers.1.weight"]
    state["encoder_pooling.9.weight"] = torch.zeros(3)
    torch.save(state, checkpoint / "pytorch_model.bin")
    _expect_error(checkpoint, tmp_path / "out",
                  r"missing 1 keys: input_blocks.2.0.emb_layers.1.weight; unexpected 1 keys: encoder_pooling.9.weight")  # fmt: skip


def test_misshaped_key_is_named(checkpoint, tmp_path, original_base):
    state = original_base.state_dict()
    state["out.2.weight"] = torch.zeros(6, 32, 5, 5)
    torch.save(state, checkpoint / "pytorch_model.bin")
    _expect_error(checkpoint, tmp_path / "out",
                  r"out.2.weight \(6, 32, 5, 5\) -> conv_out.weight \(6, 32, 5, 5\), expected \(6, 32, 3, 3\)")  # fmt: skip


def test_non_empty_output_without_overwrite(checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="output=.*out' exists and is not empty; pass overwrite"):
        convert_original_checkpoint(checkpoint, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_text_encoder_of_the_wrong_width(checkpoint, tmp_path):
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        tmp_path / "t5"
    )
    _expect_error(
        checkpoint,
        tmp_path / "out",
        "has width d_model=16; the UNet's encoder_dim is 24",
        text_encoder=tmp_path / "t5",
    )
    _expect_error(checkpoint, tmp_path / "out", "text_encoder=.*nowhere.*expected a transformers T5EncoderModel folder",
                  text_encoder=tmp_path / "nowhere")  # fmt: skip


def test_failure_while_writing_leaves_the_old_folder(checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("if_diffusers.IFPipeline.save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_original_checkpoint(checkpoint, output, overwrite=True)
    assert (output / "keep.txt").read_text() == "mine" and _leftovers(tmp_path) == []


# --- the command line ----------------------------------------------------------------------------------------


def _script(*args):
    command = [sys.executable, str(REPO / "scripts" / "convert_original_to_diffusers.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_script_converts(checkpoint, tmp_path):
    result = _script("--checkpoint", checkpoint, "--output", tmp_path / "out", "--variant", "fp16")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'out'}" in result.stdout
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()


def test_script_reports_errors_without_a_traceback(checkpoint, tmp_path, capsys):
    # the script's main in this process (test_script_converts runs it as a user does): an exception would propagate
    (checkpoint / "config.yml").unlink()
    assert convert_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    assert "error: " in (err := capsys.readouterr().err) and "config.yml: missing" in err


def test_compare_with_original_measures_the_conversion(checkpoint, tmp_path):
    from safetensors.torch import save_file

    from if_diffusers.conversion.oracle import compare_with_original

    output = convert_original_checkpoint(checkpoint, tmp_path / "out")
    assert compare_with_original(checkpoint, output) < 1e-5
    weights = output / "unet" / "diffusion_pytorch_model.safetensors"
    tampered = load_file(weights)
    tampered["down_blocks.1.attentions.0.to_k.weight"] = tampered["down_blocks.1.attentions.0.to_k.weight"].flip(0)
    save_file(tampered, weights)
    assert compare_with_original(checkpoint, output) > 1e-3


@pytest.mark.parametrize("precision", ["16", "bf16"])
def test_compare_with_original_on_half_precision_configs(tmp_path, original_base, precision):
    """Published configs say precision "16": the oracle must still compare in float32."""
    source = write_checkpoint(tmp_path / "src", {**ORIGINAL_BASE, "precision": precision},
                              {k: v.half() for k, v in original_base.state_dict().items()})  # fmt: skip
    from if_diffusers.conversion.oracle import compare_with_original

    assert compare_with_original(source, convert_original_checkpoint(source, tmp_path / "out", stage="I")) < 1e-5


@pytest.mark.parametrize("output", ["same", "parent"])
def test_output_that_holds_the_checkpoint_is_refused(checkpoint, output):
    target = checkpoint if output == "same" else checkpoint.parent
    with pytest.raises(ConversionError, match="holds the checkpoint"):
        convert_original_checkpoint(checkpoint, target, overwrite=True)
    assert (checkpoint / "config.yml").is_file() and (checkpoint / "pytorch_model.bin").is_file()


def test_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    from if_diffusers.atomic_folder import atomic_folder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    real_rename = Path.rename

    def rename(self, target):
        if ".partial-" in self.name:
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"), atomic_folder(tmp_path / "out", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and _leftovers(tmp_path) == []


def test_atomic_folder_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    """Not `mkdtemp`'s owner-only 0o700: a converted or bundled folder on a shared machine stays readable by others,
    as diffusers' own `save_pretrained` folders are."""
    from if_diffusers.atomic_folder import atomic_folder

    (tmp_path / "plain").mkdir()
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "file.txt").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "out" / "file.txt").read_text() == "x" and _leftovers(tmp_path) == []


def test_tiny_original_checkpoint_script_then_verified_conversion(tmp_path, capsys):
    # both scripts' mains in this process (test_script_converts runs the conversion script as a user does)
    make = load_script("make_tiny_original_checkpoint").main
    assert make(["--output", str(tmp_path / "src"), "--stage", "II", "--model-channels", "32"]) == 0
    assert convert_main(["--checkpoint", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--verify"]) == 0
    error = float(capsys.readouterr().out.split("max relative error against deepfloyd_if: ")[1].split()[0])
    assert error < 1e-5


def test_converted_folder_loads_and_runs_with_a_prompt(checkpoint, tmp_path, tiny_t5_folder, tiny_tokenizer_folder):
    """The hub layout is real: diffusers' loader builds the pipeline from the folder alone, with our UNet class,
    and it turns a text prompt into images."""
    output = convert_original_checkpoint(
        checkpoint, tmp_path / "out", text_encoder=tiny_t5_folder, tokenizer=tiny_tokenizer_folder
    )
    pipeline = DiffusionPipeline.from_pretrained(output, trust_remote_code=True)
    assert type(pipeline.unet) is IFUNet2DConditionModel
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a red circle on a blue background", num_inference_steps=2, height=16, width=16, output_type="pt",
        generator=torch.Generator().manual_seed(0), clean_caption=False,
    ).images  # fmt: skip
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_converted_folder_loads_into_our_pipelines(checkpoint, tmp_path, tiny_t5_folder, tiny_tokenizer_folder):
    """Our pipeline classes load a converted folder with our UNet and IF's stage-I scheduler settings."""
    import if_diffusers

    output = convert_original_checkpoint(
        checkpoint, tmp_path / "out", text_encoder=tiny_t5_folder, tokenizer=tiny_tokenizer_folder
    )
    for name in ("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"):
        pipeline = getattr(if_diffusers, name).from_pretrained(output)
        assert type(pipeline) is getattr(if_diffusers, name) and type(pipeline.unet) is IFUNet2DConditionModel
        assert pipeline.scheduler.config.sample_max_value == 1.5 and pipeline.scheduler.config.thresholding


def test_num_heads_upsample_is_ignored_with_head_channels(tmp_path):
    params = {**ORIGINAL_BASE, "num_heads_upsample": 4}  # the original ignores it when num_head_channels is set
    source = write_checkpoint(tmp_path / "src", params, original_unet(params).state_dict())
    from if_diffusers.conversion.oracle import compare_with_original

    assert compare_with_original(source, convert_original_checkpoint(source, tmp_path / "out")) < 1e-5
