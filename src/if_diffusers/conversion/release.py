"""What makes a converted folder upload-ready: its model card (`README.md`), a checksum manifest
(`checksums.sha256`, `sha256sum -c` format) and a validation run of the folder through the plugin's pipelines."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from ..installed_versions import dtype_argument
from ..models import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from ..models.original_params import OriginalUNetParams
from ..models.presets import find_preset
from ..pipelines import IFPipeline, IFSuperResolutionPipeline
from ..pipelines.hub_layout import (
    CUSTOM_COMPONENT_MODULE,
    CUSTOM_COMPONENT_SOURCE,
    CUSTOM_PIPELINE_MODULE,
    CUSTOM_PIPELINE_SOURCE,
)

logger = logging.get_logger(__name__)

AUTO = "auto"
CARD_FILE = "README.md"  # the hub shows a repository's README.md as its model card
MANIFEST = "checksums.sha256"
# `model_cards/` at the repository root, seen from inside the package through the symlink `model_cards` beside
# this file, so that one lookup serves every install (see pyproject.toml, [tool.setuptools.package-data]).
_CARDS = resources.files(__package__) / "model_cards"
_MANIFEST_LINE = re.compile(r"(?P<digest>[0-9a-f]{64}) [ *](?P<path>.+)")  # sha256sum: text " " or binary "*"
_CHUNK = 1 << 24
_TEXT_TOKENS = 77  # IF's T5 sequence length


class ChecksumError(ValueError):
    """A folder does not match its checksum manifest; the message names the first file that differs."""


class ValidationError(ValueError):
    """A converted folder does not load or does not run; the message names the folder and the failing step."""


# --- model card ------------------------------------------------------------------------------------------------


def check_model_card(model_card: str | os.PathLike | None) -> Path | str | None:
    """Check the `model_card` argument before any work: None, "auto", or the path of an existing file."""
    if model_card is None or model_card == AUTO:
        return model_card
    if not isinstance(model_card, (str, os.PathLike)):
        raise TypeError(f"model_card={model_card!r}: expected a file path, {AUTO!r} or None")
    if not Path(model_card).is_file():
        raise ValueError(f"model_card={str(model_card)!r}: no such file; expected a markdown card, {AUTO!r} or None")
    return Path(model_card)


def find_model_card(params: OriginalUNetParams) -> Path | None:
    """The packaged card of the published model whose architecture `params` describes, or None (logged with the
    reason) when no published size matches: a card names one model, so a near miss gets none."""
    try:
        preset = find_preset(params)
    except ValueError as error:
        logger.warning(f"model_card={AUTO!r}: no card written. {error}")
        return None
    card = _CARDS / f"{preset.name}.md"
    if not card.is_file():
        raise ValueError(
            f"model_card={AUTO!r}: the config matches {preset.name} but its card {card} is missing from the "
            "installed package; reinstall if-diffusers, or pass a card path or None"
        )
    logger.info(f"model card: {preset.name} ({'exact' if preset.exact else 'inferred'} preset)")
    return Path(str(card))


# --- checksum manifest -----------------------------------------------------------------------------------------


def write_checksums(folder: str | Path) -> Path:
    """Write `folder/checksums.sha256`: `<sha256>  <relative posix path>` for every other file, sorted by path.
    Write it last: it covers exactly the files present when it is written."""
    folder = Path(folder)
    lines = [f"{_sha256(path)}  {relative}\n" for relative, path in _files(folder).items()]
    manifest = folder / MANIFEST
    manifest.write_text("".join(lines), encoding="utf-8")
    return manifest


def verify_checksums(folder: str | Path) -> None:
    """Check `folder` against its `checksums.sha256`.

    Raises ChecksumError naming the first (by path) file that is listed but missing, present but unlisted, or
    whose content differs; structure is checked before any file is hashed, so those errors come at once.
    """
    folder = Path(folder)
    listed = _read_manifest(folder / MANIFEST)
    present = _files(folder)
    for relative in sorted(listed.keys() | present.keys()):
        if relative not in present:
            raise ChecksumError(f"{folder}: {relative} is listed in {MANIFEST} but missing from the folder")
        if relative not in listed:
            raise ChecksumError(f"{folder}: {relative} is not listed in {MANIFEST}: an extra file")
    for relative, path in present.items():
        digest = _sha256(path)
        if digest != listed[relative]:
            raise ChecksumError(
                f"{folder}: {relative} does not match {MANIFEST}: sha256 {digest}, expected {listed[relative]}"
            )


def _files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` but the manifest, by relative posix path, sorted."""
    files = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if path.is_dir() or relative == MANIFEST:
            continue
        if "\n" in relative or "\\" in relative:  # sha256sum would escape these; nothing we write has them
            raise ChecksumError(f"{folder}: file name {relative!r} has a newline or backslash; rename it")
        files[relative] = path
    return dict(sorted(files.items()))


def _read_manifest(manifest: Path) -> dict[str, str]:
    if not manifest.is_file():
        raise ChecksumError(f"{manifest}: missing; expected the manifest convert_original_checkpoint writes")
    listed = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        match = _MANIFEST_LINE.fullmatch(line)
        path = match and PurePosixPath(match["path"])
        if not match or path.is_absolute() or ".." in path.parts:
            raise ChecksumError(f"{manifest}:{number}: {line!r}: expected '<64 hex digits>  <relative path>'")
        if match["path"] in listed:
            raise ChecksumError(f"{manifest}:{number}: {match['path']} is listed twice")
        listed[match["path"]] = match["digest"]
    return listed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- validation ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationReport:
    """What `validate_converted` checked."""

    folder: Path
    files: int
    pipeline: str
    variant: str | None
    device: str
    dtype: torch.dtype
    output_shape: tuple[int, ...]

    def lines(self) -> list[str]:
        weights = f"variant={self.variant!r}" if self.variant else "float32 weights"
        return [
            f"checksums: {self.files} files match {MANIFEST}",
            f"layout: model_index.json names {self.pipeline} and its UNet by the files {CUSTOM_PIPELINE_MODULE}.py "
            f"and unet/{CUSTOM_COMPONENT_MODULE}.py",
            f"loaded: DiffusionPipeline.from_pretrained({str(self.folder)!r}, trust_remote_code=True) -> "
            f"{self.pipeline} with {weights}, as {self.dtype} on {self.device}",
            f"ran: one denoising step from random prompt embeddings -> images {self.output_shape}, all finite",
        ]


def validate_converted(
    folder: str | Path, variant: str | None = None, device: str | torch.device | None = None, seed: int = 0
) -> ValidationReport:
    """Check a converted folder end to end: its checksums; its hub layout (`model_index.json` names our pipeline
    and UNet classes by the small files beside them, see pipelines/hub_layout.py); that diffusers' own loader, as
    a Hub user calls it (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`), builds the plugin's
    pipeline from it (`IFPipeline`, or `IFSuperResolutionPipeline` for a 6-channel UNet; `variant="fp16"` loads the
    fp16 weights, run in float32 on the CPU and float16 on CUDA); and that one denoising step from random
    embeddings gives finite images of the UNet's `sample_size`. Random embeddings keep the check independent of the
    text encoder, which the folder may not include. Raises ChecksumError or ValidationError naming what failed.
    """
    folder = Path(folder)
    verify_checksums(folder)
    files = len(_read_manifest(folder / MANIFEST))
    config = _unet_config(folder)
    stage_2 = config.get("in_channels") == 6
    pipeline_class = IFSuperResolutionPipeline if stage_2 else IFPipeline
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if variant == "fp16" and device.type == "cuda" else torch.float32
    unet_class = IFSuperResUNet2DConditionModel if stage_2 else IFUNet2DConditionModel
    _check_layout(folder, pipeline_class, unet_class)
    if variant is not None:
        _check_variant_files(folder, variant)
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            folder, trust_remote_code=True, variant=variant, **dtype_argument(dtype)
        ).to(device)
    except Exception as error:  # diffusers, transformers and safetensors raise many types for a bad folder
        raise ValidationError(
            f"{folder}: DiffusionPipeline.from_pretrained(..., trust_remote_code=True) failed: {error}"
        ) from error
    if type(pipeline) is not pipeline_class or type(pipeline.unet) is not unet_class:
        raise ValidationError(
            f"{folder}: loaded as {type(pipeline).__name__} with a {type(pipeline.unet).__name__}, expected "
            f"{pipeline_class.__name__} with a {unet_class.__name__}"
        )
    pipeline.set_progress_bar_config(disable=True)
    try:
        images = _one_step(pipeline, config, stage_2, device, dtype, seed)
    except Exception as error:  # a folder that loads but cannot run raises whatever torch raises
        raise ValidationError(
            f"{folder}: one denoising step with {pipeline_class.__name__} failed: {error}"
        ) from error
    size = config["sample_size"]
    if tuple(images.shape) != (1, 3, size, size) or not torch.isfinite(images).all():
        raise ValidationError(
            f"{folder}: one denoising step gave images {tuple(images.shape)} with "
            f"{int((~torch.isfinite(images)).sum())} non-finite values; expected (1, 3, {size}, {size}), all finite"
        )
    return ValidationReport(folder, files, pipeline_class.__name__, variant, str(device), dtype, tuple(images.shape))


def _unet_config(folder: Path) -> dict:
    path = folder / "unet" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValidationError(f"{path}: cannot be read as a UNet config ({error})") from error
    if config.get("in_channels") not in (3, 6) or not isinstance(config.get("sample_size"), int):
        raise ValidationError(
            f"{path}: in_channels={config.get('in_channels')!r}, sample_size={config.get('sample_size')!r}; expected "
            "an IF UNet (3 input channels, or 6 for super-resolution) with an integer sample_size"
        )
    return config


def _check_layout(folder: Path, pipeline_class: type, unet_class: type) -> None:
    """`model_index.json` names the pipeline and the UNet by our files, and the files are ours (the checksums
    only prove the folder is as written, not that it was written in this layout)."""
    index = json.loads((folder / "model_index.json").read_text())
    expected = {
        "_class_name": ([CUSTOM_PIPELINE_MODULE, pipeline_class.__name__], folder / f"{CUSTOM_PIPELINE_MODULE}.py",
                        CUSTOM_PIPELINE_SOURCE),
        "unet": ([CUSTOM_COMPONENT_MODULE, unet_class.__name__], folder / "unet" / f"{CUSTOM_COMPONENT_MODULE}.py",
                 CUSTOM_COMPONENT_SOURCE),
    }  # fmt: skip
    for key, (entry, path, source) in expected.items():
        if index.get(key) != entry:
            raise ValidationError(
                f"{folder / 'model_index.json'}: {key} is {index.get(key)!r}; expected {entry!r}, as this "
                f"version's convert and save_pretrained write it: convert the checkpoint again, or re-save the folder "
                f"with {pipeline_class.__name__}.from_pretrained(folder).save_pretrained(new_folder) (it reads both)"
            )
        if not path.is_file() or path.read_text(encoding="utf-8") != source:
            raise ValidationError(
                f"{path}: {'differs from' if path.is_file() else 'missing, expected'} the file if-diffusers writes "
                "there (a star import of the installed package); convert the checkpoint again"
            )


def _check_variant_files(folder: Path, variant: str) -> None:
    """diffusers quietly loads a component's regular weights when it lacks the variant; the UNet must have it."""
    names = [path.name for path in (folder / "unet").iterdir()]
    if not any(f".{variant}." in name or f".{variant}-" in name for name in names):
        raise ValidationError(f"{folder / 'unet'}: no {variant!r} variant weights among {sorted(names)}")


def _one_step(pipeline, config: dict, stage_2: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """One denoising step: prompt embeddings `(1, 77, width)` at the UNet's text width (`encoder_hid_dim`, or the
    cross-attention width when there is no projection), and for stage II a low-res image `(1, 3, size/4, size/4)`
    in `[-1, 1]`. Returns images `(1, 3, size, size)`."""
    size, width = config["sample_size"], config.get("encoder_hid_dim") or config["cross_attention_dim"]
    inputs = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, _TEXT_TOKENS, width, generator=inputs).to(device, dtype)
    kwargs = {}
    if stage_2:
        kwargs["image"] = (torch.rand(1, 3, size // 4, size // 4, generator=inputs) * 2 - 1).to(device, dtype)
    return pipeline(
        prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=1, height=size, width=size,
        output_type="pt", generator=torch.Generator(device).manual_seed(seed), **kwargs,
    ).images  # fmt: skip
