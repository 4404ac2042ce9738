"""IF UNets. Module paths here are part of the on-disk format: saved `model_index.json` files name them."""

from .presets import PRESETS, UNetPreset
from .unet_if import IFUNet2DConditionModel
from .unet_if_super_resolution import IFSuperResUNet2DConditionModel

__all__ = ["PRESETS", "IFSuperResUNet2DConditionModel", "IFUNet2DConditionModel", "UNetPreset"]
