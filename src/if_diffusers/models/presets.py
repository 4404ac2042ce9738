"""The published DeepFloyd IF UNet sizes, as the original `config.yml` `params:` blocks.

IF-I-XL is DeepFloyd's config verbatim and IF-II-L is rebuilt exactly from its published diffusers config. The
configs of IF-I-L, IF-I-M and IF-II-M were not available offline: they are their sibling's structure with a
narrower `model_channels` (and `encoder_channels = model_channels * max(channel_mult)`, as in both known configs),
which lands within 10% of the published parameter counts but is not known to be exact.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .original_params import OriginalUNetParams


@dataclass(frozen=True)
class UNetPreset:
    """One published size: its original params and how far they can be trusted."""

    name: str
    params: dict[str, Any]
    exact: bool
    note: str

    def unet_config(self) -> dict[str, Any]:
        return OriginalUNetParams.parse(self.params).to_unet_config()


_STAGE_I_XL = {
    "image_size": 64, "in_channels": 3, "model_channels": 704, "out_channels": 6, "num_res_blocks": 3,
    "channel_mult": "1,2,3,4", "attention_resolutions": "32,16,8", "num_heads": 1, "num_head_channels": 64,
    "use_scale_shift_norm": True, "resblock_updown": True, "encoder_dim": 4096, "encoder_channels": 2816,
    "activation": "gelu", "att_pool_heads": 64, "disable_self_attentions": False, "precision": "16",
}  # fmt: skip
_STAGE_II_L = {
    "image_size": 256, "in_channels": 6, "model_channels": 160, "out_channels": 6, "num_res_blocks": [2, 2, 3, 5, 5],
    "channel_mult": "1,2,4,6,8", "attention_resolutions": "32,16", "num_heads": 1, "num_head_channels": 64,
    "use_scale_shift_norm": True, "resblock_updown": True, "encoder_dim": 4096, "encoder_channels": 1280,
    "activation": "gelu", "att_pool_heads": 64, "disable_self_attentions": False, "efficient_activation": True,
    "scale_skip_connection": True, "precision": "16",
}  # fmt: skip


def _narrower(params: dict[str, Any], model_channels: int) -> dict[str, Any]:
    widest = max(int(m) for m in str(params["channel_mult"]).split(","))
    return {**params, "model_channels": model_channels, "encoder_channels": model_channels * widest}


_INFERRED = "inferred: {sibling} with model_channels={channels}; the published count is about {published}"

PRESETS: dict[str, UNetPreset] = {
    preset.name: preset
    for preset in (
        UNetPreset("IF-I-XL", _STAGE_I_XL, True, "DeepFloyd's config.yml verbatim; 4,304,695,110 parameters"),
        UNetPreset("IF-I-L", _narrower(_STAGE_I_XL, 320), False, _INFERRED.format(sibling="IF-I-XL", channels=320, published="900M")),
        UNetPreset("IF-I-M", _narrower(_STAGE_I_XL, 192), False, _INFERRED.format(sibling="IF-I-XL", channels=192, published="400M")),
        UNetPreset("IF-II-L", _STAGE_II_L, True, "rebuilt exactly from the published diffusers config; 1,243,277,190 parameters"),
        UNetPreset("IF-II-M", _narrower(_STAGE_II_L, 96), False, _INFERRED.format(sibling="IF-II-L", channels=96, published="450M")),
    )
}  # fmt: skip


def find_preset(params: dict[str, Any] | OriginalUNetParams) -> UNetPreset:
    """The published size whose architecture `params` (a `config.yml` `params:` block, or parsed) describes.

    Compares the parsed params field by field, every field but `dropout` (training only; `precision`, the other
    runtime-only key, is not parsed at all): equal fields mean the same weights and the same function. Raises
    ValueError naming the nearest preset and the fields that differ, so a near miss (say, an inferred preset's
    `model_channels`) is visible rather than silently matched or silently skipped.
    """
    if not isinstance(params, OriginalUNetParams):
        params = OriginalUNetParams.parse(params)
    differences = {
        name: _differences(params, OriginalUNetParams.parse(preset.params)) for name, preset in PRESETS.items()
    }
    nearest = min(differences, key=lambda name: len(differences[name]))
    if not differences[nearest]:
        return PRESETS[nearest]
    raise ValueError(
        f"params: no published IF UNet ({', '.join(PRESETS)}) has these params; the nearest, {nearest}, differs in "
        + "; ".join(differences[nearest])
    )


def _differences(params: OriginalUNetParams, preset: OriginalUNetParams) -> list[str]:
    return [
        f"{field.name}={getattr(params, field.name)!r} (preset: {getattr(preset, field.name)!r})"
        for field in fields(OriginalUNetParams)
        if field.name != "dropout" and getattr(params, field.name) != getattr(preset, field.name)
    ]
