"""Checking and loading the stages of an `IFCascadePipeline`: what each stage must be (stage I takes 3 channels,
stage II 6, the x4 upscaler 7), one T5 width for both IF stages, and stage folders read and checked from their
configs before any weights load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline, UNet2DConditionModel

from .hub_access import check_hub_access, hub_arguments

STAGE_IN_CHANNELS = {
    "stage_1": (3, "a stage-I UNet (noisy image)"),
    "stage_2": (6, "a super-resolution stage-II UNet (noisy image + upscaled low-res image)"),
    "stage_3": (7, "the Stable Diffusion x4 upscaler UNet (4 latent + 3 low-res channels)"),
}
EXAMPLE_SOURCES = {
    "stage_1": "DeepFloyd/IF-I-XL-v1.0",
    "stage_2": "DeepFloyd/IF-II-L-v1.0",
    "stage_3": "stabilityai/stable-diffusion-x4-upscaler",
}
HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
GATED_HINT = (
    "DeepFloyd's IF weights are gated: accept the licence on the model's hub page and log in (`hf auth login`, or "
    "token=...)"
)


@dataclass
class StageConfig:
    """What a stage folder declares: `model_index.json`, its UNet's config, and its T5/CLIP config if it has one."""

    source: str
    model_index: dict[str, Any]
    unet: dict[str, Any]
    text_encoder: dict[str, Any] | None


def text_width(unet_config) -> int:
    """The width of the text embeddings a UNet takes: T5's `d_model` for IF UNets (`encoder_hid_dim`)."""
    return unet_config.get("encoder_hid_dim") or unet_config["cross_attention_dim"]


def check_cascade_components(text_encoder, stage_1_unet, stage_2_unet, stage_3: dict[str, Any]) -> None:
    """The cascade's components fit together: each UNet is its stage's kind, T5's width is what both IF UNets take,
    and stage III's components are all given or none (`ValueError` naming the component otherwise)."""
    for name, unet in (("stage_1", stage_1_unet), ("stage_2", stage_2_unet), ("stage_3", stage_3["stage_3_unet"])):
        if unet is not None:
            _check_in_channels(f"{name}_unet", unet.config, name)
    widths = {"stage_1_unet": text_width(stage_1_unet.config), "stage_2_unet": text_width(stage_2_unet.config)}
    if text_encoder is not None:
        widths = {"text_encoder (T5 d_model)": text_encoder.config.d_model, **widths}
    _check_same_width(widths)
    given = [name for name, component in stage_3.items() if component is not None]
    if given and len(given) != len(stage_3):
        raise ValueError(
            f"stage III needs all of {list(stage_3)} (a StableDiffusionUpscalePipeline's components); got only "
            f"{given}: pass all of them, or none to stop after stage II"
        )
    if given:
        clip_width = stage_3["stage_3_text_encoder"].config.hidden_size
        unet_width = stage_3["stage_3_unet"].config.cross_attention_dim
        if clip_width != unet_width:
            raise ValueError(
                f"stage_3_text_encoder has width {clip_width}; stage_3_unet takes text of width {unet_width}"
            )


def check_stage_configs(configs: dict[str, StageConfig]) -> None:
    """`from_pretrained_stages`' folders, from their configs: each stage's kind, and one T5 width for stages I
    and II (stage 1's T5 is the one loaded)."""
    for name, config in configs.items():
        _check_in_channels(f"{name}={config.source!r}", config.unet, name)
    text = configs["stage_1"].text_encoder
    widths = {f"stage_1={configs['stage_1'].source!r} text_encoder (T5 d_model)": text["d_model"]} if text else {}
    for name in ("stage_1", "stage_2"):
        widths[f"{name}={configs[name].source!r} unet"] = text_width(configs[name].unet)
    _check_same_width(widths)


def read_stage_config(name: str, source: str | os.PathLike, kwargs: dict[str, Any]) -> StageConfig:
    """Read a stage's configs (no weights) from a folder or a hub id; `ValueError` naming `name` if it cannot."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        index = _read_json(name, text, path / "model_index.json", "a diffusers pipeline folder")
        unet = _read_json(name, text, path / "unet" / "config.json", "a pipeline folder with a unet/ subfolder")
        encoder = path / "text_encoder" / "config.json"
        return StageConfig(text, index, unet, json.loads(encoder.read_text()) if encoder.is_file() else None)
    if _looks_like_path(text):
        raise ValueError(f"{name}={text!r}: no such folder; expected a pipeline folder or a hub id such as "
                         f"{EXAMPLE_SOURCES[name]!r}")  # fmt: skip
    hub = {key: kwargs[key] for key in HUB_ARGUMENTS if key in kwargs}
    check_hub_access(name, text, **hub_arguments(kwargs))
    try:
        index = DiffusionPipeline.load_config(text, **hub)
        unet = UNet2DConditionModel.load_config(text, subfolder="unet", **hub)
        encoder = None
        if (index.get("text_encoder") or [None])[0] is not None and name != "stage_3":
            from transformers import PretrainedConfig

            encoder = PretrainedConfig.get_config_dict(text, subfolder="text_encoder", **hub)[0]
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{name}={text!r} is not a local folder and could not be read from the Hugging Face Hub ({error}). "
            f"{GATED_HINT}"
        ) from error
    return StageConfig(text, index, unet, encoder)


def load_stage(name: str, pipeline_class: type[DiffusionPipeline], source, kwargs: dict[str, Any]):
    """`pipeline_class.from_pretrained(source, **kwargs)`, with a hub failure reported as a `ValueError` naming the
    stage and the licence hint."""
    try:
        return pipeline_class.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ValueError(f"{name}={str(source)!r} could not be loaded ({error}). {GATED_HINT}") from error


def _check_in_channels(argument: str, unet_config, stage: str) -> None:
    expected, kind = STAGE_IN_CHANNELS[stage]
    given = unet_config["in_channels"]
    if given == expected:
        return
    named = next((f" ({k} is {STAGE_IN_CHANNELS[s][1]}: pass it as {s})" for s, (c, k) in
                  STAGE_IN_CHANNELS.items() if c == given), "")  # fmt: skip
    raise ValueError(
        f"{argument}: its UNet takes {given} input channels{named}; expected {expected}, {kind}, e.g. "
        f"{EXAMPLE_SOURCES[stage]!r}"
    )


def _check_same_width(widths: dict[str, int]) -> None:
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{name}: {width}" for name, width in widths.items())
        raise ValueError(
            f"the IF stages disagree on the T5 width ({listed}); expected one width: stages I and II share one T5 "
            "encoder (T5-v1.1-XXL, 4096, for DeepFloyd's models)"
        )


def _read_json(name: str, source: str, path: Path, expected: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{name}={source!r} has no {path.name} at {path}; expected {expected}")
    return json.loads(path.read_text())


def _looks_like_path(text: str) -> bool:
    """Not a hub id ("org/name" or "name"): absolute, relative to `.`/`~`, deeper than one slash, or backslashed."""
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
