"""What the UNet sees besides the noisy images: T5 prompt encoding (diffusers' `encode_prompt` contract) and the
embeddings batched for classifier-free guidance, style transfer and positive-prompt mixing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import logging

from ..text import preprocess_prompts

logger = logging.get_logger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 77  # IF's T5 was trained on 77 tokens


@dataclass
class Conditioning:
    """Everything the UNet sees besides the noisy images, batched for guidance as `[uncond, cond(, positive)]`.

    `prompt_embeds` `(k * B, L, D)`; `pooled_text_embeds` the same shape when the pooled text differs (style
    transfer); super-resolution adds `upscaled` `(k * B, 3, H, W)` (clean, or augmented once), `noise_level` `(k * B,)`
    and `redraw_augmentation` to redraw the augmentation noise (from `generator`) at every step as the original does;
    with `low_res_consistency`, `low_res_reference` `(B, 3, H, W)` is the clean low-res image upsampled
    bicubically, whose coarse content every step keeps (`guidance.low_res_consistency`).
    """

    prompt_embeds: torch.Tensor
    copies: int
    guidance_scale: float
    positive_mixer: float | None = None
    pooled_text_embeds: torch.Tensor | None = None
    upscaled: torch.Tensor | None = None
    noise_level: torch.Tensor | None = None
    redraw_augmentation: bool = False
    generator: torch.Generator | list[torch.Generator] | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    low_res_reference: torch.Tensor | None = None
    low_res_consistency: LowResConsistency | None = None


@dataclass(frozen=True)
class LowResConsistency:
    """A super-resolution pipeline's `low_res_consistency_*` arguments (checked by `checks.check_low_res_consistency`):
    the scale in pixels, `factor`, coarser than which every step keeps the low-res input's content, and from
    `late_timestep` on, `late_factor` instead."""

    factor: int
    late_factor: int | None = None
    late_timestep: int | None = None

    def step_factors(self, timesteps: torch.Tensor | list[int]) -> list[int]:
        """The factor of each step over `timesteps` `(S,)`: `late_factor` for the steps that end below
        `late_timestep` (at the next timestep, or at clean images after the last step), `factor` for the others.
        Read once before the loop (one host copy of the timesteps, only with a late factor)."""
        if self.late_factor is None:
            return [self.factor] * len(timesteps)
        reached = [int(t) for t in torch.as_tensor(timesteps).tolist()[1:]] + [-1]  # -1: clean, after the last step
        return [self.late_factor if t < self.late_timestep else self.factor for t in reached]


class PromptConditioningMixin:
    """Prompt encoding of the IF pipelines; needs `tokenizer`, `text_encoder`, `unet` and `_execution_device`."""

    # --- prompts ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clean_caption: bool = True,
        max_sequence_length: int | None = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T5 embeddings of the prompt and, with guidance, of the negative prompt ("" if none).

        Same contract as diffusers' `encode_prompt`, except that `clean_caption` defaults to `True` here as in
        `__call__`, and `max_sequence_length` (77, as IF was trained) may be raised, or be `None` to pad to the longest
        of the prompts and negative prompts, to encode long prompts in full. A prompt longer than the token count is
        cut with a warning naming it. Returns `(B * num_images_per_prompt, L, D)` tensors (the second `None` without
        guidance).
        """
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass prompt or prompt_embeds to encode_prompt; got neither")
        if prompt is not None and negative_prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(
                f"negative_prompt is a {type(negative_prompt).__name__}; expected {type(prompt).__name__} like prompt"
            )
        device = device or self._execution_device
        prompts = preprocess_prompts(prompt, clean_caption) if prompt is not None else None
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = None
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = (
                [""] * batch_size if negative_prompt is None else preprocess_prompts(negative_prompt, clean_caption)
            )
            if len(negatives) != batch_size:
                raise ValueError(f"negative_prompt has {len(negatives)} prompts; expected {batch_size} like prompt")
        if prompt_embeds is None:
            length = max_sequence_length or self._longest_tokens(prompts + (negatives or []))
            prompt_embeds = self._encode_text(prompts, length, device, "prompt")
        if negatives is not None:  # as many tokens as the prompt, so that both stack into one UNet batch
            negative_prompt_embeds = self._encode_text(negatives, prompt_embeds.shape[1], device, "negative_prompt")
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def _check_text_components(self) -> None:
        """Text prompts need the tokenizer and T5 (optional components): say so rather than fail inside them."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "prompt was given but this pipeline has no tokenizer/text_encoder; pass prompt_embeds (and "
                "negative_prompt_embeds), or load the pipeline with its T5 components"
            )

    def _longest_tokens(self, prompts: list[str]) -> int:
        """T5 token count (end token included) of the longest of `prompts`, already preprocessed."""
        self._check_text_components()
        return self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids.shape[-1]

    def _encode_text(self, prompts: list[str], length: int, device, argument: str) -> torch.Tensor:
        """T5 encoder outputs `(N, length, D)` of preprocessed prompts, padded (or cut, with a warning naming
        `argument`) to `length` tokens as diffusers does: padding tokens are attended to by the UNet, so the padded
        length is part of the conditioning."""
        self._check_text_components()
        full = self.tokenizer(prompts, padding="longest", return_tensors="pt")
        counts = full.attention_mask.sum(-1).tolist()  # tokens per prompt, end token included
        if max(counts) > length:  # the cut words of each prompt that was cut (the end token takes the last place)
            removed = [self.tokenizer.decode(ids[length - 1 : count - 1])
                       for ids, count in zip(full.input_ids, counts) if count > length]  # fmt: skip
            logger.warning(
                f"{argument} was cut at {length} T5 tokens (max_sequence_length, or the length of prompt_embeds; IF "
                f"was trained on 77): pass a larger max_sequence_length, or None, to encode it in full. Cut: {removed}"
            )
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")  # fmt: skip
        mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def _prepare_conditioning(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, *, num_images_per_prompt, device,
        clean_caption, max_sequence_length, guidance_scale, cross_attention_kwargs, style_prompt=None,
        style_prompt_embeds=None, positive_prompt=None, positive_prompt_embeds=None, positive_mixer=None,
    ) -> Conditioning:  # fmt: skip
        """Encode every prompt and batch the embeddings as the UNet consumes them: `[uncond, cond(, positive)]` with
        guidance, `cond` alone without; a style prompt replaces the pooled text of the `cond` (and `positive`) rows.
        Sets the state the properties report (`guidance_scale`, `cross_attention_kwargs`, `interrupt` reset)."""
        self._guidance_scale, self._cross_attention_kwargs = guidance_scale, cross_attention_kwargs
        self._interrupt = False
        cfg = self.do_classifier_free_guidance
        extra_texts = style_prompt is not None or positive_prompt is not None
        if max_sequence_length is None and prompt is not None and extra_texts:
            # every text of the call at the longest one's length, so that none is cut to stack the batches
            texts = [t for p in (prompt, negative_prompt, style_prompt, positive_prompt) if p is not None
                     for t in preprocess_prompts(p, clean_caption)]  # fmt: skip
            max_sequence_length = self._longest_tokens(texts)
        cond, uncond = self.encode_prompt(prompt, cfg, num_images_per_prompt, device, negative_prompt, prompt_embeds,
                                          negative_prompt_embeds, clean_caption, max_sequence_length)  # fmt: skip
        style = self._encode_extra("style_prompt", style_prompt, style_prompt_embeds, cond, num_images_per_prompt,
                                   clean_caption)  # fmt: skip
        if not cfg:  # (B, L, D); the style prompt, if any, is pooled instead of the prompt
            return Conditioning(cond, 1, guidance_scale, pooled_text_embeds=style,
                                cross_attention_kwargs=cross_attention_kwargs)  # fmt: skip
        positive = self._encode_extra("positive_prompt", positive_prompt, positive_prompt_embeds, cond,
                                      num_images_per_prompt, clean_caption)  # fmt: skip
        batches = [uncond, cond] + ([positive] if positive is not None else [])  # k x (B, L, D) -> (k*B, L, D)
        pooled = None
        if style is not None:  # the original pools [style, positive, negative] for [cond, positive, uncond]
            pooled = torch.cat([uncond, style] + ([positive] if positive is not None else []))
        return Conditioning(
            torch.cat(batches), len(batches), guidance_scale,
            positive_mixer=(0.25 if positive_mixer is None else positive_mixer) if positive is not None else None,
            pooled_text_embeds=pooled, cross_attention_kwargs=cross_attention_kwargs,
        )  # fmt: skip

    def _encode_extra(self, argument: str, prompt, embeds, like: torch.Tensor, num_images_per_prompt: int,
                      clean_caption: bool) -> torch.Tensor | None:  # fmt: skip
        """A style or positive prompt (named `argument`) `(B * num_images_per_prompt, L, D)`, encoded to `like`'s
        token count `L` so that the batches stack; `None` when neither text nor embeddings are given."""
        if prompt is None and embeds is None:
            return None
        if embeds is None:
            embeds = self._encode_text(preprocess_prompts(prompt, clean_caption), like.shape[1], like.device, argument)
        if embeds.shape[1] != like.shape[1]:
            raise ValueError(
                f"{argument}_embeds has {embeds.shape[1]} tokens; expected {like.shape[1]} like prompt_embeds"
            )
        return embeds.to(like).repeat_interleave(num_images_per_prompt, dim=0)
