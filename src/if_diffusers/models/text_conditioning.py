"""What every IF UNet adds to diffusers' `UNet2DConditionModel`: a separate text input for the attention pooling
into the time embedding, a per-generation cache of the text projection and pooling, the published presets, and SDPA
attention kept when slicing is switched off."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .attention import restore_sdpa_processors
from .presets import PRESETS


@dataclass
class _CachedText:
    """A computed text conditioning and the exact tensor it was computed from."""

    source: torch.Tensor
    version: int
    value: torch.Tensor

    def matches(self, source: torch.Tensor) -> bool:
        # Identity, not equality: comparing values would synchronise with the device at every step.
        return self.source is source and self.version == _version(source)


def _version(tensor: torch.Tensor) -> int:
    # Inference tensors track no version counter, and outside inference mode they cannot change in place.
    return -1 if tensor.is_inference() else tensor._version


def _cacheable(source: torch.Tensor) -> bool:
    """Whether a cache entry can tell if `source` changed: not while autograd records (a cached graph would be
    freed by the first backward), not while compiling (the lookup is Python state), and not for an inference tensor
    inside inference mode (it may change in place without a version count)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return not (torch.is_inference_mode_enabled() and source.is_inference())


class IFTextConditioningMixin:
    """Mixed into `UNet2DConditionModel` by the IF UNets.

    * `added_cond_kwargs={"text_embeds": (B, L, encoder_hid_dim)}` drives the attention pooling into the time
      embedding, while `encoder_hidden_states` drives cross-attention: the original's `timestep_text_emb`, used by
      style transfer (the style prompt is pooled, the content prompt is attended to). Without it both use
      `encoder_hidden_states`, as in the original and in diffusers.
    * `set_attention_slice(None)` (so `pipe.disable_attention_slicing()`) restores the SDPA attention processors the
      UNet was built with; `set_default_attn_processor()` still sets diffusers' reference `AttnAddedKVProcessor`.
    * Inside `with unet.text_cache():` the text projection (`encoder_hid_proj`) and pooling (`add_embedding`) are
      computed once per distinct input tensor and reused across denoising steps, like the original's `use_cache`.
      A different tensor, or the same tensor modified in place, is recomputed, so a cache never serves a stale
      prompt; leaving the block (or `clear_text_cache()`) drops it.
    """

    _preset_stage: ClassVar[str]
    # diffusers' `compile_repeated_blocks` convention (regional compilation). An IF UNet's blocks differ in width and
    # resampling from level to level: each distinct one compiles once (32 in the bundled model's two UNets).
    _repeated_blocks: ClassVar[list[str]] = ["ResnetBlock2D", "Attention"]
    _text_cache_depth: int = 0
    _text_cache_entries: dict[str, _CachedText] | None = None

    @classmethod
    def from_preset(cls, name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Build one of the published IF sizes with random weights.

        Args:
            name: "IF-I-M", "IF-I-L" or "IF-I-XL" (stage I class), "IF-II-M" or "IF-II-L" (super-resolution class).
                IF-I-XL and IF-II-L are exact; IF-I-L, IF-I-M and IF-II-M are inferred from their sibling's
                structure and may differ from the published weights (see `if_diffusers.models.presets`).
            device: where to create the weights; `"meta"` allocates no memory (for counting or sharded loading).
            dtype: parameter dtype; float32 if `None`.
        """
        preset = PRESETS.get(name)
        if preset is None:
            raise ValueError(f"name={name!r} is not a preset: expected one of {sorted(PRESETS)}")
        stage = "II" if preset.params["in_channels"] == 6 else "I"
        if stage != cls._preset_stage:
            raise ValueError(
                f"name={name!r} is a stage-{stage} preset; {cls.__name__} builds stage-{cls._preset_stage} models: "
                f"use {'IFSuperResUNet2DConditionModel' if stage == 'II' else 'IFUNet2DConditionModel'}.from_preset"
            )
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = cls.from_config(preset.unet_config())
        return model if dtype is None else model.to(dtype)

    @contextlib.contextmanager
    def text_cache(self) -> Iterator[None]:
        """Reuse the text projection and pooling across the UNet calls of one generation (see class docs)."""
        self._text_cache_depth += 1
        try:
            yield
        finally:
            self._text_cache_depth -= 1
            if self._text_cache_depth == 0:
                self.clear_text_cache()

    def clear_text_cache(self) -> None:
        """Drop the cached text projection and pooling."""
        self._text_cache_entries = None

    def set_attention_slice(self, slice_size: str | int | list[int | None] | None = "auto") -> None:
        # identical to UNet2DConditionModel.set_attention_slice except: layers given no slice (None) get the SDPA
        # processor back rather than the slower plain one diffusers picks (see `if_diffusers.models.attention`).
        super().set_attention_slice(slice_size)
        restore_sdpa_processors(self)

    def _cached_text(self, name: str, source: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]):
        if self._text_cache_depth == 0 or not _cacheable(source):
            return compute(source)
        entries = self._text_cache_entries if self._text_cache_entries is not None else {}
        entry = entries.get(name)
        if entry is None or not entry.matches(source):
            entry = entries[name] = _CachedText(source, _version(source), compute(source))
        self._text_cache_entries = entries
        return entry.value

    def get_aug_embed(self, emb: torch.Tensor, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, Any]):
        # identical to UNet2DConditionModel.get_aug_embed except: for "text", `added_cond_kwargs["text_embeds"]`
        # may replace the pooled text, and the pooling is cached inside `text_cache()`.
        if self.config.addition_embed_type != "text":
            return super().get_aug_embed(emb, encoder_hidden_states, added_cond_kwargs)
        pooled_text = (added_cond_kwargs or {}).get("text_embeds", encoder_hidden_states)
        if pooled_text.shape[0] != emb.shape[0]:
            raise ValueError(
                f"added_cond_kwargs['text_embeds'] has batch {pooled_text.shape[0]}; expected the sample's batch "
                f"{emb.shape[0]}"
            )
        return self._cached_text("pooled_text", pooled_text, self.add_embedding)

    def process_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, Any]):
        # identical to UNet2DConditionModel.process_encoder_hidden_states except: "text_proj" is cached.
        if self.config.encoder_hid_dim_type != "text_proj" or self.encoder_hid_proj is None:
            return super().process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)
        return self._cached_text("projected_text", encoder_hidden_states, self.encoder_hid_proj)
