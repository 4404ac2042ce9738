"""Stage I of DeepFloyd IF: text -> 64x64 pixels (IF-I-M / IF-I-L / IF-I-XL)."""

from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401  (ModelMixin: see below)

from .text_conditioning import IFTextConditioningMixin

# diffusers' pipeline loader imports this module (model_index.json names it) and looks up `ModelMixin` in it
# to find how to load the class: the import above is part of the on-disk format.


class IFUNet2DConditionModel(IFTextConditioningMixin, UNet2DConditionModel):
    """The stage-I IF UNet: diffusers' `UNet2DConditionModel` with the original IF's text conditioning.

    identical to `UNet2DConditionModel` except (see `IFTextConditioningMixin`): a separate pooled-text input through
    `added_cond_kwargs["text_embeds"]`, the `text_cache()` for the text projection and pooling, and `from_preset`.
    Config and state-dict keys are the stock ones, so diffusers' DeepFloyd `unet/` folders load unchanged.

    Input `sample` is `(B, 3, H, W)` in about `[-1, 1]`, `encoder_hidden_states` is T5 output `(B, L, 4096)`; the
    output is `(B, 6, H, W)`: predicted noise (3 channels) and the learned-range variance interpolation (3 channels).
    """

    _preset_stage = "I"
