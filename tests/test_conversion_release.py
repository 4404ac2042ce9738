"""An upload-ready converted folder: the matching model card as README.md, the checksum manifest written last, and
validation by reloading the folder and running one denoising step (library and command line)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ORIGINAL_BASE, STAGE_II_CONFIGS, load_script, original_unet
from safetensors.torch import load_file, save_file

from if_diffusers.conversion import (
    ChecksumError,
    ConversionError,
    ValidationError,
    convert_original_checkpoint,
    find_model_card,
    validate_converted,
    verify_checksums,
    write_checkpoint,
    write_checksums,
)
from if_diffusers.models.original_params import OriginalUNetParams
from if_diffusers.models.presets import PRESETS, find_preset

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "model_cards"
MANIFEST = "checksums.sha256"
TINY = {"I": ORIGINAL_BASE, "II": STAGE_II_CONFIGS["super_res_plain"]}  # both 16px: the cheapest of each stage


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Original-layout checkpoints of the tiny stage-I and stage-II configs, written once."""
    root = tmp_path_factory.mktemp("originals")
    return {stage: write_checkpoint(root / stage, params, original_unet(params, seed=3).state_dict())
            for stage, params in TINY.items()}  # fmt: skip


@pytest.fixture(scope="module")
def script():
    return load_script("convert_original_to_diffusers")


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    """A private copy of the shared converted stage-I folder, free to corrupt."""
    return Path(shutil.copytree(converted("base")[1], tmp_path / "copy"))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


# --- the model card --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_finds_its_own_card(name):
    """Params equal up to runtime-only keys match; the card comes from the installed package and is the repo's."""
    params = {**PRESETS[name].params, "precision": "bf16", "dropout": 0.1}
    assert find_preset(params).name == name
    card = find_model_card(OriginalUNetParams.parse(params))
    assert card.name == f"{name}.md" and card.read_bytes() == (CARDS / f"{name}.md").read_bytes()


def test_presets_match_on_parsed_params_not_spelling():
    """The original accepts several spellings of one architecture; all of them are the same model."""
    respelled = {**PRESETS["IF-I-XL"].params, "channel_mult": [1, 2, 3, 4], "num_res_blocks": [3, 3, 3, 3],
                 "attention_resolutions": [2, 4, 8]}  # fmt: skip
    assert find_preset(respelled).name == "IF-I-XL"


def test_a_near_miss_names_the_nearest_preset_and_what_differs():
    with pytest.raises(ValueError, match=r"the nearest, IF-I-M, differs in model_channels=256 \(preset: 192\)$"):
        find_preset({**PRESETS["IF-I-M"].params, "model_channels": 256})
    with pytest.raises(ValueError, match=r"the nearest, IF-II-L, differs in scale_skip_connection=False"):
        find_preset({**PRESETS["IF-II-L"].params, "scale_skip_connection": False})


def test_an_explicit_card_is_copied_to_readme(checkpoints, tmp_path):
    output = convert_original_checkpoint(checkpoints["I"], tmp_path / "out", model_card=CARDS / "IF-I-M.md")
    assert (output / "README.md").read_bytes() == (CARDS / "IF-I-M.md").read_bytes()
    assert "README.md" in (output / MANIFEST).read_text()


@pytest.mark.parametrize("model_card", ["auto", None])
def test_no_card_for_a_config_of_no_published_model(checkpoints, tmp_path, caplog, model_card):
    with caplog.at_level(logging.INFO, logger="if_diffusers"):
        output = convert_original_checkpoint(checkpoints["I"], tmp_path / "out", model_card=model_card)
    assert not (output / "README.md").exists()
    logged = "model_card='auto': no card written. params: no published IF UNet" in caplog.text
    assert (
        logged == (model_card == "auto")
        and ("nearest, IF-I-XL, differs in model_channels=32" in caplog.text) == logged
    )


def test_a_missing_card_fails_before_reading_the_checkpoint(tmp_path, script, capsys):
    """The card is checked first: here the checkpoint does not exist either, and the card is what is reported."""
    missing = tmp_path / "nowhere" / "card.md"
    with pytest.raises(ConversionError, match=r"model_card='.*card.md': no such file; expected a markdown card"):
        convert_original_checkpoint(tmp_path / "no-checkpoint", tmp_path / "out", model_card=missing)
    with pytest.raises(TypeError, match=r"model_card=3: expected a file path, 'auto' or None"):
        convert_original_checkpoint(tmp_path / "no-checkpoint", tmp_path / "out", model_card=3)
    argv = ["--checkpoint", tmp_path / "no-checkpoint", "--output", tmp_path / "out", "--model-card", missing]
    assert script.main([str(a) for a in argv]) == 1
    assert "error: model_card=" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a staging folder


# --- the checksum manifest -------------------------------------------------------------------------------------


def test_manifest_lists_every_file_sorted_in_sha256sum_format(checkpoints, tmp_path):
    output = convert_original_checkpoint(checkpoints["II"], tmp_path / "out", variant="fp16", max_shard_size="20KB",
                                         model_card=CARDS / "IF-II-M.md")  # fmt: skip
    lines = (output / MANIFEST).read_text().splitlines()
    assert all(re.fullmatch(r"[0-9a-f]{64}  \S+", line) for line in lines)
    listed = [line[66:] for line in lines]
    assert (
        listed == _files(output)
        and "README.md" in listed
        and "image_noising_scheduler/scheduler_config.json" in listed
    )
    assert sum(".fp16-" in path for path in listed) > 1  # the fp16 shards are there too
    for line in lines:
        assert line[:64] == hashlib.sha256((output / line[66:]).read_bytes()).hexdigest()
    verify_checksums(output)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU coreutils' sha256sum")
def test_sha256sum_accepts_the_manifest(folder):
    result = subprocess.run(["sha256sum", "--check", "--strict", MANIFEST], cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _flip_a_byte(folder: Path) -> str:
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return r"unet/diffusion_pytorch_model.safetensors does not match checksums.sha256: sha256 [0-9a-f]{64}, expected"


def _remove_a_file(folder: Path) -> str:
    (folder / "scheduler" / "scheduler_config.json").unlink()
    return "scheduler/scheduler_config.json is listed in checksums.sha256 but missing from the folder"


def _add_a_file(folder: Path) -> str:
    (folder / "unet" / "notes.txt").write_text("added after the conversion")
    return r"unet/notes.txt is not listed in checksums.sha256: an extra file"


def _edit_the_manifest(folder: Path) -> str:
    with open(folder / MANIFEST, "a") as file:
        file.write(f"{'0' * 64}  ../outside.txt\n")
    return r"checksums.sha256:\d+: '0{64}  ../outside.txt': expected '<64 hex digits>  <relative path>'"


def _remove_the_manifest(folder: Path) -> str:
    (folder / MANIFEST).unlink()
    return "checksums.sha256: missing; expected the manifest convert_original_checkpoint writes"


@pytest.mark.parametrize(
    "corrupt", [_flip_a_byte, _remove_a_file, _add_a_file, _edit_the_manifest, _remove_the_manifest]
)
def test_verify_checksums_names_what_changed(folder, corrupt):
    verify_checksums(folder)
    message = corrupt(folder)
    with pytest.raises(ChecksumError, match=message):
        verify_checksums(folder)


def test_missing_and_extra_files_are_reported_before_any_content_change(folder):
    """Structure first (no hashing), then contents; each in path order."""
    _flip_a_byte(folder)
    (folder / "unet" / "zz.txt").write_text("extra")
    (folder / "model_index.json").unlink()
    with pytest.raises(ChecksumError, match="model_index.json is listed in checksums.sha256 but missing"):
        verify_checksums(folder)
    write_checksums(folder)
    verify_checksums(folder)  # rewriting the manifest accepts the folder as it now is


# --- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["I", "II"])
def test_sharded_fp16_variant_folder_reloads_and_validates(checkpoints, tmp_path, stage):
    output = convert_original_checkpoint(checkpoints[stage], tmp_path / "out", variant="fp16", max_shard_size="20KB")
    assert len(list((output / "unet").glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))) > 1
    report = validate_converted(output, variant="fp16", device="cpu")
    assert report.pipeline == ("IFSuperResolutionPipeline" if stage == "II" else "IFPipeline")
    assert (report.variant, report.device, report.dtype, report.output_shape) == ("fp16", "cpu", torch.float32,
                                                                                   (1, 3, 16, 16))  # fmt: skip
    assert report.files == len(_files(output))


def test_validation_of_a_variant_the_folder_lacks_fails(folder):
    with pytest.raises(ValidationError, match=r"unet: no 'fp16' variant weights among \['config.json', "):
        validate_converted(folder, variant="fp16")


def test_validation_fails_on_non_finite_output(folder):
    """Weights that pass the checksums (the manifest rewritten) but make the UNet produce NaN fail the run."""
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, weights)
    write_checksums(folder)
    with pytest.raises(
        ValidationError, match=r"images \(1, 3, 16, 16\) with 768 non-finite values; expected .* all finite"
    ):
        validate_converted(folder, device="cpu")


def test_validation_fails_on_a_folder_that_does_not_load(folder):
    (folder / "unet" / "config.json").write_text('{"in_channels": 3, "sample_size": 16, "block_out_channels": [8]}')
    write_checksums(folder)
    with pytest.raises(
        ValidationError, match=r"DiffusionPipeline.from_pretrained\(\.\.\., trust_remote_code=True\) failed"
    ):
        validate_converted(folder, device="cpu")


def test_validation_checks_the_hub_layout(folder):
    """A folder in the layout diffusers' `download` refuses over HTTP (UNet named by module path, as written before
    the component files) or with a foreign file in place of ours fails before anything loads, naming the key or
    the file."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    old_layout = {**index, "unet": ["if_diffusers.models.unet_if", "IFUNet2DConditionModel"]}
    index_path.write_text(json.dumps(old_layout))
    write_checksums(folder)
    with pytest.raises(
        ValidationError, match=r"unet is \['if_diffusers.models.unet_if', .*expected \['if_diffusers_model'"
    ):
        validate_converted(folder, device="cpu")
    index_path.write_text(json.dumps(index))
    (folder / "unet" / "if_diffusers_model.py").write_text("import os\n")
    write_checksums(folder)
    with pytest.raises(
        ValidationError, match=r"unet/if_diffusers_model.py: differs from the file if-diffusers writes"
    ):
        validate_converted(folder, device="cpu")


# --- the command line ------------------------------------------------------------------------------------------


def test_script_converts_and_validates(checkpoints, tmp_path, script, capsys):
    argv = ["--checkpoint", checkpoints["II"], "--output", tmp_path / "out", "--variant", "fp16",
            "--max-shard-size", "20KB", "--model-card", CARDS / "IF-II-M.md", "--validate"]  # fmt: skip
    assert script.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out'}" in printed and re.search(
        r"checksums: \d+ files match checksums.sha256", printed
    )
    assert "layout: model_index.json names IFSuperResolutionPipeline and its UNet by the files" in printed
    assert re.search(
        r"loaded: DiffusionPipeline.from_pretrained\(.*, trust_remote_code=True\) -> "
        r"IFSuperResolutionPipeline with variant='fp16'",
        printed,
    )
    assert "ran: one denoising step from random prompt embeddings -> images (1, 3, 16, 16), all finite" in printed
    assert (tmp_path / "out" / "README.md").read_bytes() == (CARDS / "IF-II-M.md").read_bytes()


def test_script_validates_an_existing_folder_and_fails_on_corruption(folder, script, capsys):
    assert script.main(["--output", str(folder), "--validate"]) == 0
    assert "trust_remote_code=True) -> IFPipeline with float32 weights" in capsys.readouterr().out
    message = _flip_a_byte(folder)
    assert script.main(["--output", str(folder), "--validate"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: validation failed: ") and re.search(message, error)


def test_script_needs_a_checkpoint_unless_validating(script, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()


def test_script_pushes_a_validated_conversion_the_generic_loader_reads(checkpoints, local_hub, tmp_path, script,
                                                                        monkeypatch, capsys):  # fmt: skip
    """`--validate --push-to-hub REPO` uploads the converted folder to the tests' Hub (over HTTP) in one commit, and
    diffusers' generic loader builds our pipeline and UNet classes from the pushed repo; a push without a token, or
    of a folder that holds no conversion, fails with one line."""
    from diffusers import DiffusionPipeline

    from if_diffusers import IFSuperResolutionPipeline, IFSuperResUNet2DConditionModel

    argv = ["--checkpoint", checkpoints["II"], "--output", tmp_path / "out", "--validate", "--push-to-hub",
            "me/IF-II-tiny", "--private"]  # fmt: skip
    assert script.main([str(a) for a in argv]) == 1  # no token: the conversion stays, nothing is pushed
    assert "error: --push-to-hub me/IF-II-tiny: " in capsys.readouterr().err and (tmp_path / "out").is_dir()
    monkeypatch.setenv("HF_TOKEN", "hf_local_test")
    assert script.main(["--output", str(tmp_path / "out"), "--validate", "--push-to-hub", "me/IF-II-tiny"]) == 0
    assert re.search(r"pushed .*out to .*/me/IF-II-tiny/commit/[0-9a-f]{40}", capsys.readouterr().out)
    pushed = local_hub.repo_folder("me/IF-II-tiny")
    assert {p.name for p in (tmp_path / "out").iterdir()} <= {p.name for p in pushed.iterdir()}
    loaded = DiffusionPipeline.from_pretrained("me/IF-II-tiny", trust_remote_code=True, cache_dir=tmp_path / "cache")
    assert type(loaded) is IFSuperResolutionPipeline and type(loaded.unet) is IFSuperResUNet2DConditionModel

    assert script.main(["--output", str(tmp_path / "empty"), "--push-to-hub", "me/nothing"]) == 1
    assert "holds no model_index.json: nothing converted to push" in capsys.readouterr().err
    assert script.main(["--output", str(tmp_path / "out"), "--push-to-hub", "me/IF-II-tiny", "--private"]) == 1
    assert "the repo exists and is public; make it private on the Hub first" in capsys.readouterr().err
    _flip_a_byte(tmp_path / "out")  # a folder changed since its conversion is not pushed
    commits = local_hub.commit_sha("me/IF-II-tiny")
    assert script.main(["--output", str(tmp_path / "out"), "--push-to-hub", "me/IF-II-tiny"]) == 1
    assert "error: --push-to-hub me/IF-II-tiny: " in capsys.readouterr().err
    assert local_hub.commit_sha("me/IF-II-tiny") == commits
