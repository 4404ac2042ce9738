"""`IFCascadePipeline.from_pretrained_stages`' `quantization_config`: diffusers' `PipelineQuantizationConfig` naming
the cascade's components, as `IFCascadePipeline.from_pretrained` reads it, split into one config per stage pipeline
under that stage's own component names. `text_encoder` is T5 (loaded once, with stage I), `stage_1_unet` stage I's
`unet`, `stage_3_text_encoder` the x4 upscaler's CLIP `text_encoder`, and so on: a config naming `text_encoder`
quantizes T5 and never stage III's CLIP, which its pipeline also calls `text_encoder`."""

from __future__ import annotations

from typing import Any

from diffusers import PipelineQuantizationConfig

# the cascade's model components -> (stage, its name in that stage's pipeline)
STAGE_COMPONENTS = {
    "text_encoder": ("stage_1", "text_encoder"),
    "safety_checker": ("stage_1", "safety_checker"),
    "stage_1_unet": ("stage_1", "unet"),
    "stage_2_unet": ("stage_2", "unet"),
    "stage_3_text_encoder": ("stage_3", "text_encoder"),
    "stage_3_unet": ("stage_3", "unet"),
    "stage_3_vae": ("stage_3", "vae"),
}


def stage_quantization_configs(config: PipelineQuantizationConfig | None,
                               stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """`{stage: {"quantization_config": its config}}` for each of `stages` that `config` quantizes something of
    (`{}` for the others, and for all when `config` is None). A config without `components_to_quantize` or
    `quant_mapping` quantizes every model of every stage, as it does every model of a pipeline. `TypeError` for
    a config of another class, `ValueError` for a name that is not one of the cascade's models of `stages`."""
    if config is None:
        return {stage: {} for stage in stages}
    if not isinstance(config, PipelineQuantizationConfig):
        raise TypeError(f"quantization_config is a {type(config).__name__}; expected diffusers' "
                        "PipelineQuantizationConfig, naming the cascade's components (e.g. text_encoder for T5)")  # fmt: skip
    mapping = config.quant_mapping
    names = config.components_to_quantize if mapping is None else list(mapping)
    if names is None:  # every model: the same backend and settings for each stage
        return {stage: {"quantization_config": PipelineQuantizationConfig(config.quant_backend, config.quant_kwargs)}
                for stage in stages}  # fmt: skip
    names = [names] if isinstance(names, str) else list(names)  # diffusers 0.35 keeps a string as given
    unknown = [name for name in names if name not in STAGE_COMPONENTS or STAGE_COMPONENTS[name][0] not in stages]
    if unknown:
        known = [name for name, (stage, _) in STAGE_COMPONENTS.items() if stage in stages]
        raise ValueError(f"quantization_config names {unknown}, not models of this cascade; expected the cascade's "
                         f"component names: {known} (text_encoder is T5)")  # fmt: skip
    configs: dict[str, dict[str, Any]] = {stage: {} for stage in stages}
    for stage in stages:
        own = {STAGE_COMPONENTS[name][1]: name for name in names if STAGE_COMPONENTS[name][0] == stage}
        if not own:
            continue
        if mapping is None:
            split = PipelineQuantizationConfig(
                config.quant_backend, config.quant_kwargs, components_to_quantize=list(own)
            )
        else:
            split = PipelineQuantizationConfig(
                quant_mapping={component: mapping[name] for component, name in own.items()}
            )
        configs[stage] = {"quantization_config": split}
    return configs
