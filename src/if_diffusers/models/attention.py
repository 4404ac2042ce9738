"""Attention processors of IF UNets: PyTorch's fused attention (SDPA) by default, and again after slicing is off.

Every attention layer of an IF UNet is an added-KV `Attention` (text keys and values next to the image's). diffusers
builds them with the SDPA `AttnAddedKVProcessor2_0`, but `Attention.set_attention_slice(None)`, which
`pipe.disable_attention_slicing()` reaches through `UNet2DConditionModel.set_attention_slice`, gives them the plain
`AttnAddedKVProcessor` (explicit softmax, more memory, slower) and says nothing: after slicing on and off the UNet is
not the one that was loaded. `restore_sdpa_processors` puts the SDPA processor back.

`set_default_attn_processor()` keeps diffusers' meaning: the reference `AttnAddedKVProcessor`, asked for by name
(diffusers' own tests use it for reproducible outputs). `set_attention_slice(None)` on an IF UNet returns to SDPA.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor, AttnAddedKVProcessor2_0


def restore_sdpa_processors(model: torch.nn.Module) -> None:
    """Give every attention layer of `model` that holds diffusers' plain `AttnAddedKVProcessor` the SDPA
    `AttnAddedKVProcessor2_0` it was built with (same maths, fused kernel); sliced and other processors are kept.

    Call it right after `set_attention_slice`, which has just replaced every layer's processor: a plain one then
    means "no slice here", never a processor the user chose.
    """
    for module in model.modules():
        if isinstance(module, Attention) and type(module.processor) is AttnAddedKVProcessor:
            module.set_processor(AttnAddedKVProcessor2_0())
