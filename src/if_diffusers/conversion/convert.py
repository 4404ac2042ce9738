"""Original DeepFloyd IF checkpoint folder -> Hugging Face hub layout (`model_index.json`, `unet/`,
`scheduler/`, `image_noising_scheduler/`, optionally `text_encoder/` and `tokenizer/`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import accelerate
import torch
from diffusers.utils import logging

from ..atomic_folder import atomic_folder, check_writable_folder
from ..installed_versions import t5_tokenizer_class
from ..models import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from ..models.original_params import OriginalParamsError, OriginalUNetParams, Stage
from ..pipelines import IFPipeline, IFSuperResolutionPipeline
from ..scheduling import denoising_scheduler, noising_scheduler
from .key_table import KeyMismatchError, convert_state_dict
from .original_checkpoint import CONFIG_FILE, CheckpointError, read_params, read_state_dict, weights_path
from .release import AUTO, CARD_FILE, check_model_card, find_model_card, write_checksums

logger = logging.get_logger(__name__)

STAGES: tuple[Stage, ...] = ("I", "II")
VARIANTS = ("fp16",)


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message names the file or argument and what was expected."""


def convert_original_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    stage: Stage | None = None,
    variant: str | None = None,
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    model_card: str | os.PathLike | None = AUTO,
) -> Path:
    """Convert the DeepFloyd checkpoint folder `checkpoint` into an upload-ready diffusers folder at `output`:
    the pipeline, `README.md` (the model card) and, written last, `checksums.sha256` over every other file.

    Args:
        checkpoint: folder with `config.yml` (`params:`) and `pytorch_model.bin` or `model.safetensors`.
        output: folder to write; written under a temporary name and renamed when complete.
        stage: "I" or "II"; detected from the config (3 or 6 input channels) when `None`.
        variant: "fp16" to write `diffusion_pytorch_model.fp16.safetensors` beside the float32 weights.
        text_encoder, tokenizer: transformers `T5EncoderModel` / T5 tokenizer folders to include.
        overwrite: replace a non-empty `output`.
        max_shard_size: largest UNet weight file before sharding.
        model_card: markdown file to copy to `README.md`; "auto" (default) picks the card of the published model
            whose params equal the checkpoint's (`models.presets.find_preset`) and, when none does, logs why and
            writes no card; None writes none.
    Returns: the output folder.
    """
    check_writable_folder(output, overwrite)
    source, target = Path(checkpoint).resolve(), Path(output).resolve()
    if target == source or target in source.parents:
        raise ConversionError(f"output={str(output)!r} holds the checkpoint {str(checkpoint)!r}; write elsewhere")
    if variant is not None and variant not in VARIANTS:
        raise ConversionError(f"variant={variant!r}: expected one of {VARIANTS} or None")
    try:
        model_card = check_model_card(model_card)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    checkpoint = Path(checkpoint)
    params = _parse_params(checkpoint, stage)
    card = find_model_card(params) if model_card == AUTO else model_card
    unet = _load_unet(checkpoint, params)
    text_encoder_model = _load_text_encoder(text_encoder, params.encoder_dim) if text_encoder else None
    tokenizer_object = _load_tokenizer(tokenizer) if tokenizer else None

    components = {"tokenizer": tokenizer_object, "text_encoder": text_encoder_model, "unet": unet,
                      "scheduler": denoising_scheduler(params.stage), "safety_checker": None, "feature_extractor": None,
                      "watermarker": None, "requires_safety_checker": False}  # fmt: skip
    if params.stage == "II":
        components["image_noising_scheduler"] = noising_scheduler(
            unet.config.noise_augmentation_beta_schedule, unet.config.noise_augmentation_num_train_timesteps
        )
    pipeline = (IFSuperResolutionPipeline if params.stage == "II" else IFPipeline)(**components)
    with atomic_folder(output, overwrite) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        if variant == "fp16":
            unet.half().save_pretrained(
                staging / "unet", safe_serialization=True, variant="fp16", max_shard_size=max_shard_size
            )
        if card is not None:
            shutil.copyfile(card, staging / CARD_FILE)
        write_checksums(staging)  # last: it lists every file written above, whatever save_pretrained wrote
    logger.info("converted %s (stage %s) to %s", checkpoint, params.stage, output)
    return Path(output)


def _parse_params(checkpoint: Path, stage: Stage | None) -> OriginalUNetParams:
    if stage is not None and stage not in STAGES:
        raise ConversionError(f"stage={stage!r}: expected one of {STAGES} or None to detect it")
    try:
        params = OriginalUNetParams.parse(read_params(checkpoint))
    except OriginalParamsError as error:
        raise ConversionError(f"{checkpoint / CONFIG_FILE}: {error}") from error
    except CheckpointError as error:
        raise ConversionError(str(error)) from error
    if params.in_channels not in (3, 6):
        raise ConversionError(
            f"{checkpoint / CONFIG_FILE}: params.in_channels={params.in_channels} is no known stage: expected 3 "
            "(stage I) or 6 (super-resolution, noisy image + low-res image)"
        )
    if stage is not None and stage != params.stage:
        raise ConversionError(
            f"stage={stage!r} but {checkpoint / CONFIG_FILE} describes a stage-{params.stage} UNet "
            f"(in_channels={params.in_channels})"
        )
    return params


def _load_unet(checkpoint: Path, params: OriginalUNetParams):
    """Build the UNet without allocating weights, then fill it with the converted tensors."""
    try:
        path = weights_path(checkpoint)
        original = read_state_dict(path)
    except CheckpointError as error:
        raise ConversionError(str(error)) from error
    has_aug_proj = any(key.startswith("aug_proj.") for key in original)
    if has_aug_proj != (params.stage == "II"):
        raise ConversionError(
            f"{path}: {'has' if has_aug_proj else 'lacks'} the noise-augmentation embedding aug_proj.*, but "
            f"{CONFIG_FILE} describes a stage-{params.stage} UNet"
        )
    unet_class = IFSuperResUNet2DConditionModel if params.stage == "II" else IFUNet2DConditionModel
    with accelerate.init_empty_weights():  # parameters on "meta"; buffers (the augmentation schedule) real
        unet = unet_class.from_config(params.to_unet_config())
    expected = {key: tensor.shape for key, tensor in unet.state_dict().items()}
    # Weights are stored float32 like diffusers' DeepFloyd repos (fp16/bf16 upcast exactly); `variant` adds fp16.
    try:
        converted = convert_state_dict(original, params, expected, dtype=torch.float32)
    except KeyMismatchError as error:
        raise ConversionError(f"{path}: {error}") from error
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.eval()


def _load_text_encoder(folder: str | Path, encoder_dim: int):
    from transformers import T5EncoderModel

    try:
        model = T5EncoderModel.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"text_encoder={str(folder)!r}: expected a transformers T5EncoderModel folder ({error})"
        ) from error
    if model.config.d_model != encoder_dim:
        raise ConversionError(
            f"text_encoder={str(folder)!r} has width d_model={model.config.d_model}; the UNet's encoder_dim is "
            f"{encoder_dim}"
        )
    return model


def _load_tokenizer(folder: str | Path):
    try:
        return t5_tokenizer_class(folder).from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"tokenizer={str(folder)!r}: expected a T5 tokenizer folder ({error})") from error
