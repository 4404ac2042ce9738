"""The explicit table from original `deepfloyd_if` UNet state-dict keys to `UNet2DConditionModel` keys.

The table is built by walking the original `UNetModel.__init__` block by block, so it lists every key a
checkpoint of the given params must have and no other. Special cases, each named where it is built:

* qkv split: the original's fused `qkv` 1x1 conv lays channels out per head as `[q_h, k_h, v_h]`; diffusers
  has separate `to_q/to_k/to_v` linears over heads `[h0, h1, ...]`. `encoder_kv` likewise becomes
  `add_k_proj/add_v_proj`. Attention without self-attention has a q-only `qkv`.
* 1x1 `Conv1d` weights `(out, in, 1)` become `Linear` weights `(out, in)`.
* `encoder_proj` -> `encoder_hid_proj` (absent when the T5 width equals the attention width).
* `encoder_pooling` -> `add_embedding` (LayerNorm, attention pooling, Linear, LayerNorm).
* `aug_proj` -> `class_embedding` (super-resolution only: the noise-augmentation level embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.original_params import OriginalUNetParams

Transform = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


class KeyMismatchError(ValueError):
    """A state dict does not fit the table: keys missing, unexpected or mis-shaped."""


@dataclass(frozen=True)
class KeyMapping:
    """One original tensor and the diffusers tensors it becomes."""

    source: str
    targets: tuple[str, ...]
    transform: Transform


def _same(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


def _conv1d_to_linear(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor.squeeze(-1) if tensor.ndim == 3 else tensor,)


def _split_heads(parts: int, heads: int) -> Transform:
    """qkv split: `(heads * parts * ch, ...)` laid out per head as `[part_0, part_1, ...]` -> `parts` tensors of
    `(heads * ch, ...)` laid out head after head, as diffusers' `Attention` reads them."""

    def split(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensor = _conv1d_to_linear(tensor)[0]
        if tensor.shape[0] % (heads * parts):
            raise KeyMismatchError(
                f"cannot split {tuple(tensor.shape)} into {parts} parts of {heads} heads: dim 0 is not divisible"
            )
        per_head = tensor.reshape(heads, parts, tensor.shape[0] // (heads * parts), *tensor.shape[1:])
        return tuple(per_head[:, part].reshape(-1, *tensor.shape[1:]).contiguous() for part in range(parts))

    return split


def _module(source: str, target: str, transform: Transform = _same, params=("weight", "bias")) -> list[KeyMapping]:
    return [KeyMapping(f"{source}.{p}", (f"{target}.{p}",), transform) for p in params]


_RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2"}  # fmt: skip


def _resnet(source: str, target: str, changes_channels: bool) -> list[KeyMapping]:
    parts = dict(_RESNET_PARTS, **({"skip_connection": "conv_shortcut"} if changes_channels else {}))
    return [m for original, ours in parts.items() for m in _module(f"{source}.{original}", f"{target}.{ours}")]


def _attention(source: str, target: str, heads: int, cross_only: bool) -> list[KeyMapping]:
    table = _module(f"{source}.norm", f"{target}.group_norm") + _module(
        f"{source}.norm_encoder", f"{target}.norm_cross"
    )
    table += _module(f"{source}.proj_out", f"{target}.to_out.0", _conv1d_to_linear)
    self_targets = ("to_q",) if cross_only else ("to_q", "to_k", "to_v")
    for p in ("weight", "bias"):
        table.append(KeyMapping(f"{source}.qkv.{p}", tuple(f"{target}.{t}.{p}" for t in self_targets),
                                _split_heads(len(self_targets), heads)))  # fmt: skip
        table.append(KeyMapping(f"{source}.encoder_kv.{p}", (f"{target}.add_k_proj.{p}", f"{target}.add_v_proj.{p}"),
                                _split_heads(2, heads)))  # fmt: skip
    return table


def build_key_table(params: OriginalUNetParams) -> list[KeyMapping]:
    """Every key of an original checkpoint with these params, in the order `UNetModel.__init__` creates them."""
    p = params
    table = _module("time_embed.0", "time_embedding.linear_1") + _module("time_embed.2", "time_embedding.linear_2")
    table += _module("input_blocks.0.0", "conv_in")

    def heads(level: int) -> int:
        return p.model_channels * p.channel_mult[level] // p.head_dims[level]

    # Down path: input_blocks[1:] hold, per level, num_res_blocks (ResBlock[, AttentionBlock]) then a downsampler.
    channels, skip_channels, index = p.model_channels, [p.model_channels], 1
    for level, mult in enumerate(p.channel_mult):
        for block in range(p.num_res_blocks[level]):
            out = p.model_channels * mult
            table += _resnet(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{block}", channels != out)
            if p.attention_levels[level]:
                table += _attention(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{block}",
                                    heads(level), p.cross_only_levels[level])  # fmt: skip
            channels = out
            skip_channels.append(channels)
            index += 1
        if level != len(p.channel_mult) - 1:
            table += _resnet(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0", False)
            skip_channels.append(channels)
            index += 1

    last = len(p.channel_mult) - 1
    table += _resnet("middle_block.0", "mid_block.resnets.0", False)
    table += _attention("middle_block.1", "mid_block.attentions.0", heads(last), p.mid_cross_only)
    table += _resnet("middle_block.2", "mid_block.resnets.1", False)

    # Up path: output_blocks hold, per level from the deepest, num_res_blocks + 1 (ResBlock on the concatenated
    # skip[, AttentionBlock][, upsampling ResBlock after the level's last block]).
    index = 0
    for up_block, level in enumerate(reversed(range(len(p.channel_mult)))):
        for block in range(p.num_res_blocks[level] + 1):
            out = p.model_channels * p.channel_mult[level]
            target = f"up_blocks.{up_block}"
            table += _resnet(f"output_blocks.{index}.0", f"{target}.resnets.{block}",
                             channels + skip_channels.pop() != out)  # fmt: skip
            channels, position = out, 1
            if p.attention_levels[level]:
                table += _attention(f"output_blocks.{index}.1", f"{target}.attentions.{block}", heads(level),
                                    p.cross_only_levels[level])  # fmt: skip
                position = 2
            if level and block == p.num_res_blocks[level]:
                table += _resnet(f"output_blocks.{index}.{position}", f"{target}.upsamplers.0", False)
            index += 1

    table += _module("out.0", "conv_norm_out") + _module("out.2", "conv_out")
    # encoder_pooling -> add_embedding: LayerNorm, AttentionPooling, Linear, LayerNorm.
    table += _module("encoder_pooling.0", "add_embedding.norm1")
    table += _module("encoder_pooling.1", "add_embedding.pool", params=("positional_embedding",))
    for projection in ("k_proj", "q_proj", "v_proj"):
        table += _module(f"encoder_pooling.1.{projection}", f"add_embedding.pool.{projection}")
    table += _module("encoder_pooling.2", "add_embedding.proj") + _module("encoder_pooling.3", "add_embedding.norm2")
    if p.encoder_dim != p.encoder_channels:
        table += _module("encoder_proj", "encoder_hid_proj")  # encoder_proj -> encoder_hid_proj
    if p.stage == "II":
        table += _module("aug_proj.0", "class_embedding.linear_1") + _module("aug_proj.2", "class_embedding.linear_2")
    return table


def convert_state_dict(
    original: dict[str, torch.Tensor],
    params: OriginalUNetParams,
    expected_shapes: dict[str, torch.Size],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Map an original state dict to diffusers keys (cast to `dtype` if given), emptying `original` as it goes so
    that peak memory stays near one copy of the weights.

    `expected_shapes` are the target model's state-dict shapes. Raises `KeyMismatchError` naming every original
    key that is missing or unexpected and every tensor whose shape does not fit.
    """
    table = build_key_table(params)
    missing = [m.source for m in table if m.source not in original]
    unexpected = sorted(set(original) - {m.source for m in table})
    if missing or unexpected:
        raise KeyMismatchError(_key_report(missing, unexpected, len(table)))
    converted, misshaped = {}, []
    for mapping in table:
        tensor = original.pop(mapping.source)
        try:
            outputs = mapping.transform(tensor)
        except KeyMismatchError as error:
            misshaped.append(f"{mapping.source} {tuple(tensor.shape)}: {error}")
            continue
        for target, value in zip(mapping.targets, outputs):
            if target not in expected_shapes:
                raise KeyMismatchError(f"key table names {target!r}, which the diffusers UNet does not have")
            if value.shape != expected_shapes[target]:
                misshaped.append(
                    f"{mapping.source} {tuple(tensor.shape)} -> {target} {tuple(value.shape)}, "
                    f"expected {tuple(expected_shapes[target])}"
                )
            converted[target] = value if dtype is None else value.to(dtype)
    if misshaped:
        raise KeyMismatchError(
            f"{len(misshaped)} tensors have shapes that do not fit the config: " + "; ".join(misshaped)
        )
    unfilled = sorted(set(expected_shapes) - set(converted))
    if unfilled:
        raise KeyMismatchError(f"the key table leaves diffusers keys unfilled: {unfilled}")
    return converted


def _key_report(missing: list[str], unexpected: list[str], expected_count: int) -> str:
    lines = [f"the checkpoint does not match its config.yml params (expected {expected_count} tensors)"]
    if missing:
        lines.append(f"missing {len(missing)} keys: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        lines.append(
            f"unexpected {len(unexpected)} keys: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
        )
    return "; ".join(lines)
