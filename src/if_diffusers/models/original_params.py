"""The original `deepfloyd_if.model.UNetModel` keyword arguments (`params:` of a DeepFloyd `config.yml`), read the
way the original reads them, and their translation into a `UNet2DConditionModel` config.

The original accepts several spellings for the same thing (`channel_mult` as "1,2,3,4" or a list, attention
resolutions as image-size divisors in a string or as downsample rates in a list, `num_res_blocks` as an int or a
list). `OriginalUNetParams.parse` resolves them exactly as `UNetModel.__init__` does, including its quirks, so a
converted checkpoint computes the same function as the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Stage = Literal["I", "II"]

# `scale_skip_connection` multiplies every residual sum by 0.7071 (1 / sqrt(2), arXiv:2104.07636); diffusers
# divides by `output_scale_factor`, so the factor is its reciprocal.
SKIP_CONNECTION_SCALE = 0.7071

SUPPORTED_ACTIVATIONS = ("gelu", "silu")

# Keys of `UNetModel.__init__` that do not shape the weights: numerics of the original runtime, dropout, and
# options `_reject_unsupported` checks.
_RUNTIME_ONLY_KEYS = {"precision", "dims", "dropout", "conv_resample", "interpolate_mode"}
_KNOWN_KEYS = {
    "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions", "activation",
    "encoder_dim", "att_pool_heads", "encoder_channels", "image_size", "disable_self_attentions", "channel_mult",
    "num_classes", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
    "resblock_updown", "efficient_activation", "scale_skip_connection",
} | _RUNTIME_ONLY_KEYS  # fmt: skip


class OriginalParamsError(ValueError):
    """The original `params:` block cannot be read or has no diffusers equivalent."""


def _int_list(value: Any, name: str) -> list[int]:
    try:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        if isinstance(value, int):
            return [value]
        return [int(v) for v in value]
    except (TypeError, ValueError) as error:
        raise OriginalParamsError(
            f"params.{name}={value!r}: expected a comma-separated string or a list of integers"
        ) from error


@dataclass(frozen=True)
class OriginalUNetParams:
    """The architecture an original `params:` block describes, with every spelling resolved.

    `attention_levels[i]` / `cross_only_levels[i]` say whether level `i` (downsample rate `2**i`) has attention and
    whether that attention skips self-attention; `mid_cross_only` is the same for the middle block.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    cross_only_levels: tuple[bool, ...]
    mid_cross_only: bool
    head_dims: tuple[int, ...]
    activation: str
    encoder_dim: int
    encoder_channels: int
    att_pool_heads: int
    image_size: int
    use_scale_shift_norm: bool
    efficient_activation: bool
    scale_skip_connection: bool
    dropout: float

    @property
    def stage(self) -> Stage:
        """Stage I denoises a 3-channel image; super-resolution stages also take the 3-channel low-res image."""
        return "II" if self.in_channels == 2 * 3 else "I"

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * max(self.channel_mult)

    @classmethod
    def parse(cls, params: dict[str, Any]) -> "OriginalUNetParams":
        """Resolve `params` exactly as `deepfloyd_if.model.UNetModel.__init__` does."""
        if not isinstance(params, dict):
            raise OriginalParamsError(
                f"params: expected a mapping of UNetModel keyword arguments, got {type(params).__name__}"
            )
        required = ["in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
                    "activation", "encoder_dim", "att_pool_heads", "encoder_channels", "image_size"]  # fmt: skip
        missing = [key for key in required if key not in params]
        if missing:
            raise OriginalParamsError(f"params is missing {missing}: these UNetModel arguments have no default")
        unknown = sorted(set(params) - _KNOWN_KEYS)
        if unknown:
            raise OriginalParamsError(f"params has keys {unknown} that deepfloyd_if.model.UNetModel does not take")
        _reject_unsupported(params)

        image_size = int(params["image_size"])
        channel_mult = tuple(_int_list(params.get("channel_mult", (1, 2, 4, 8)), "channel_mult"))
        levels = len(channel_mult)
        rates = [2**level for level in range(levels)]

        # UNetModel: a string lists image-size divisors ("32,16,8" at 64px -> rates 2, 4, 8); a list lists rates.
        attention = params["attention_resolutions"]
        if isinstance(attention, str):
            attention_rates = {image_size // r for r in _int_list(attention, "attention_resolutions")}
        else:
            attention_rates = set(_int_list(attention, "attention_resolutions"))
        cross_only_rates = _disable_self_attention_rates(params.get("disable_self_attentions"), attention, image_size)

        num_res_blocks = _int_list(params["num_res_blocks"], "num_res_blocks")
        if len(num_res_blocks) == 1:
            num_res_blocks = num_res_blocks * levels
        if len(num_res_blocks) != levels:
            raise OriginalParamsError(
                f"params.num_res_blocks={params['num_res_blocks']!r}: expected one entry per channel_mult level "
                f"({levels}), got {len(num_res_blocks)}"
            )
        model_channels = int(params["model_channels"])
        level_channels = [model_channels * m for m in channel_mult]
        attention_levels = tuple(rate in attention_rates for rate in rates)
        # The middle block (at the last level) always has attention; other levels only where listed.
        head_dims = tuple(
            _head_dim(params, ch, needed=attention_levels[level] or level == levels - 1)
            for level, ch in enumerate(level_channels)
        )
        if int(params["encoder_channels"]) % 32:
            raise OriginalParamsError(
                f"params.encoder_channels={params['encoder_channels']}: GroupNorm(32) needs a multiple of 32"
            )

        return cls(
            in_channels=int(params["in_channels"]),
            out_channels=int(params["out_channels"]),
            model_channels=model_channels,
            channel_mult=channel_mult,
            num_res_blocks=tuple(num_res_blocks),
            attention_levels=attention_levels,
            cross_only_levels=tuple(rate in cross_only_rates for rate in rates),
            mid_cross_only=rates[-1] in cross_only_rates,
            head_dims=head_dims,
            activation=str(params["activation"]),
            encoder_dim=int(params["encoder_dim"]),
            encoder_channels=int(params["encoder_channels"]),
            att_pool_heads=int(params["att_pool_heads"]),
            image_size=image_size,
            use_scale_shift_norm=bool(params.get("use_scale_shift_norm", False)),
            efficient_activation=bool(params.get("efficient_activation", False)),
            scale_skip_connection=bool(params.get("scale_skip_connection", False)),
            dropout=float(params.get("dropout", 0.0)),
        )

    def to_unet_config(self) -> dict[str, Any]:
        """The `UNet2DConditionModel` config computing the same function (diffusers' DeepFloyd layout)."""
        down, up = [], []
        for has_attention in self.attention_levels:
            down.append("SimpleCrossAttnDownBlock2D" if has_attention else "ResnetDownsampleBlock2D")
            up.insert(0, "SimpleCrossAttnUpBlock2D" if has_attention else "ResnetUpsampleBlock2D")
        skip_scale = 1 / SKIP_CONNECTION_SCALE if self.scale_skip_connection else 1.0
        config: dict[str, Any] = {
            "sample_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "block_out_channels": [self.model_channels * m for m in self.channel_mult],
            "layers_per_block": _int_or_list(self.num_res_blocks),
            "attention_head_dim": _diffusers_head_dims(self),
            "only_cross_attention": list(self.cross_only_levels),
            "mid_block_only_cross_attention": self.mid_cross_only,
            "cross_attention_dim": self.encoder_channels,
            "encoder_hid_dim": self.encoder_dim if self.encoder_dim != self.encoder_channels else None,
            "encoder_hid_dim_type": "text_proj" if self.encoder_dim != self.encoder_channels else None,
            "addition_embed_type": "text",
            "addition_embed_type_num_heads": self.att_pool_heads,
            "cross_attention_norm": "group_norm",
            "resnet_time_scale_shift": "scale_shift" if self.use_scale_shift_norm else "default",
            "act_fn": self.activation,
            "time_embedding_dim": self.time_embed_dim,
            # efficient_activation: one activation on the summed embedding instead of one inside every ResBlock.
            "time_embedding_act_fn": self.activation if self.efficient_activation else None,
            "resnet_skip_time_act": self.efficient_activation,
            "resnet_out_scale_factor": skip_scale,
            "mid_block_scale_factor": skip_scale,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "dropout": self.dropout,
        }
        if self.stage == "II":
            # The noise-augmentation level enters through `aug_proj`, a timestep-style embedding.
            config["class_embed_type"] = "timestep"
        return config


def _reject_unsupported(params: dict[str, Any]) -> None:
    """Architectures `UNetModel` can build but `UNet2DConditionModel` cannot express."""
    checks = [
        (
            "resblock_updown",
            params.get("resblock_updown", False) is True,
            "true (diffusers' IF blocks resample inside ResBlocks)",
        ),
        ("num_classes", params.get("num_classes") is None, "null (class-conditional IF models do not exist)"),
        ("dims", int(params.get("dims", 2)) == 2, "2"),
        ("activation", params.get("activation") in SUPPORTED_ACTIVATIONS, f"one of {SUPPORTED_ACTIVATIONS}"),
        ("interpolate_mode", params.get("interpolate_mode", "bilinear") == "bilinear", "'bilinear'"),
        # num_heads_upsample only matters with a fixed head count (num_head_channels == -1).
        (
            "num_heads_upsample",
            int(params.get("num_head_channels", -1)) != -1
            or params.get("num_heads_upsample", -1) in (-1, params.get("num_heads", 1)),
            "-1 or num_heads",
        ),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise OriginalParamsError(f"params.{name}={params.get(name)!r} is not supported: expected {expected}")
    first_mult = _int_list(params.get("channel_mult", (1, 2, 4, 8)), "channel_mult")[0]
    if first_mult != 1:
        raise OriginalParamsError(
            f"params.channel_mult starts with {first_mult}: diffusers sizes the timestep projection by "
            "block_out_channels[0], so the first multiplier must be 1"
        )


def _disable_self_attention_rates(value: Any, attention_resolutions: Any, image_size: int) -> set[int]:
    """The downsample rates whose attention skips self-attention, as `UNetModel.__init__` computes them."""
    if not value:
        return set()
    if value is True:
        # The original stores `attention_resolutions` as given here: a string becomes a tuple of characters,
        # which matches no integer rate, so `True` disables nothing unless the resolutions were a list of rates.
        return (
            set()
            if isinstance(attention_resolutions, str)
            else set(_int_list(attention_resolutions, "attention_resolutions"))
        )
    if isinstance(value, str):
        return {image_size // r for r in _int_list(value, "disable_self_attentions")}
    return set(_int_list(value, "disable_self_attentions"))


def _head_dim(params: dict[str, Any], channels: int, needed: bool) -> int:
    """The attention head width at a level of `channels` channels; checked only where the level has attention."""
    head_channels = int(params.get("num_head_channels", -1))
    if head_channels == -1:
        heads = int(params.get("num_heads", 1))
        if not needed:
            return channels // heads
        if channels % heads:
            raise OriginalParamsError(f"params.num_heads={heads} does not divide a level's {channels} channels")
        return channels // heads
    if needed and channels % head_channels:
        raise OriginalParamsError(
            f"params.num_head_channels={head_channels} does not divide a level's {channels} channels"
        )
    return head_channels


def _diffusers_head_dims(params: OriginalUNetParams) -> int | list[int]:
    """`attention_head_dim` for `UNet2DConditionModel`.

    diffusers reads `attention_head_dim[i]` for down block `i` and, unreversed, for up block `i` (which serves level
    `L - 1 - i`), and `[-1]` for the middle block. With a fixed head width (every published IF model) one int
    serves all; with a fixed head count the per-level widths must be placed so both readings agree.
    """
    if len(set(params.head_dims)) == 1:
        return params.head_dims[0]
    levels = len(params.head_dims)
    wanted: dict[int, int] = {levels - 1: params.head_dims[-1]}  # the middle block
    for level, has_attention in enumerate(params.attention_levels):
        if not has_attention:
            continue
        for index in (level, levels - 1 - level):
            if wanted.setdefault(index, params.head_dims[level]) != params.head_dims[level]:
                raise OriginalParamsError(
                    f"attention head widths {list(params.head_dims)} (fixed num_heads) cannot be expressed: "
                    "UNet2DConditionModel reads attention_head_dim unreversed on its up path; use num_head_channels"
                )
    return [wanted.get(index, params.head_dims[index]) for index in range(levels)]


def _int_or_list(values: tuple[int, ...]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)
