"""The original implementation as an oracle: build `deepfloyd_if` UNets and check a conversion against them.

Needs the original package, which only imports cleanly without its (ancient, pinned) dependencies:
`pip install --no-deps deepfloyd-if==1.0.1`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..models import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from .original_checkpoint import read_params, read_state_dict, weights_path


def _deepfloyd_model():
    try:
        from deepfloyd_if import model
    except ImportError as error:
        raise ImportError(
            "checking against the original needs deepfloyd_if: pip install --no-deps deepfloyd-if==1.0.1"
        ) from error
    return model


class FixedNoiseDiffusion:
    """Stands in for `SuperResUNetModel.low_res_diffusion` so the augmentation noise is chosen by the caller
    (`self.noise`) instead of drawn from the global RNG inside the original's forward."""

    def __init__(self):
        from deepfloyd_if.model.respace import create_gaussian_diffusion

        # What IFStageII.get_diffusion('1000') builds.
        self.diffusion = create_gaussian_diffusion(
            steps=1000, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True,
            rescale_learned_sigmas=True, timestep_respacing="1000",
        )  # fmt: skip
        self.noise: torch.Tensor | None = None

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.diffusion.q_sample(x_start, t, noise=self.noise)


def build_original_unet(params: dict[str, Any]) -> torch.nn.Module:
    """An original `UNetModel` (3 input channels) or `SuperResUNetModel` (6) from `config.yml` params."""
    model = _deepfloyd_model()
    if int(params["in_channels"]) == 6:
        return model.SuperResUNetModel(low_res_diffusion=FixedNoiseDiffusion(), **params)
    return model.UNetModel(**params)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter random values: the original zero-initialises its output layers, which would make a
    wrong conversion of them look right."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            scale = 1 / math.sqrt(parameter[0].numel()) if parameter.ndim >= 2 else 0.2
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale + (parameter.ndim == 1) * 0.5)
    return module.eval()


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|: scale-free, and not blown up by entries near zero."""
    return ((actual.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def compare_with_original(
    checkpoint: str | Path, converted: str | Path, seed: int = 0, aug_level: float = 0.25
) -> float:
    """Run the original UNet of `checkpoint` and the converted `converted/unet` on the same random inputs (one
    image at the config's size, different texts for cross-attention and pooling) and return the relative error."""
    params = read_params(checkpoint)
    # Compare in float32: the original computes in its config's `precision` ("16" in the published configs).
    original = build_original_unet({**params, "precision": "32"})
    original.load_state_dict({k: v.float() for k, v in read_state_dict(weights_path(checkpoint)).items()})
    original.float().eval()
    is_super_res = int(params["in_channels"]) == 6
    ours = (IFSuperResUNet2DConditionModel if is_super_res else IFUNet2DConditionModel).from_pretrained(
        Path(converted) / "unet"
    )
    generator = torch.Generator().manual_seed(seed)
    size, width = int(params["image_size"]), int(params["encoder_dim"])
    x = torch.randn(1, 3, size, size, generator=generator)
    text, pooled = torch.randn(1, 9, width, generator=generator), torch.randn(1, 5, width, generator=generator)
    timesteps = torch.tensor([617])
    original_kwargs, our_kwargs = {}, {}
    if is_super_res:
        low_res = torch.rand(1, 3, size // 4, size // 4, generator=generator) * 2 - 1
        original.low_res_diffusion.noise = torch.randn(x.shape, generator=generator)
        original_kwargs = {"low_res": low_res, "aug_level": aug_level}
        our_kwargs = {"low_res_image": low_res, "noise_level": int(aug_level * 1000),
                      "augmentation_noise": original.low_res_diffusion.noise}  # fmt: skip
    with torch.no_grad():
        expected = original(x, timesteps, text_emb=text, timestep_text_emb=pooled, **original_kwargs)
        actual = ours(x, timesteps, text, added_cond_kwargs={"text_embeds": pooled}, **our_kwargs).sample
    return relative_error(actual, expected)
