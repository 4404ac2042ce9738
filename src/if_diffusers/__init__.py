"""DeepFloyd IF for diffusers: the original IF's UNets, checkpoint conversion and (soon) pipelines."""

from .models import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel

__version__ = "0.1.0"

__all__ = ["IFSuperResUNet2DConditionModel", "IFUNet2DConditionModel", "__version__"]
