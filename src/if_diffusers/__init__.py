"""DeepFloyd IF for diffusers: the original IF's UNets, stage pipelines and checkpoint conversion."""

# first: settles what the installed transformers serves as CLIPImageProcessor before diffusers imports it
from . import installed_versions  # noqa: F401, I001
from .models import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from .pipelines import (
    IFCascadePipeline,
    IFCascadePipelineOutput,
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    IFInpaintingPipeline,
    IFInpaintingSuperResolutionPipeline,
    IFPipeline,
    IFPipelineOutput,
    IFSuperResolutionPipeline,
)

__version__ = "0.1.0"

__all__ = [
    "IFCascadePipeline",
    "IFCascadePipelineOutput",
    "IFImg2ImgPipeline",
    "IFImg2ImgSuperResolutionPipeline",
    "IFInpaintingPipeline",
    "IFInpaintingSuperResolutionPipeline",
    "IFPipeline",
    "IFPipelineOutput",
    "IFSuperResUNet2DConditionModel",
    "IFSuperResolutionPipeline",
    "IFUNet2DConditionModel",
    "__version__",
]
