"""DeepFloyd IF for diffusers: the original IF's UNets, stage pipelines and checkpoint conversion."""

# first: torchao, where it is installed, imported without the lines its user cannot act on (transformers imports it
# with its models); then what the installed transformers serves as CLIPImageProcessor, settled before diffusers
# imports it
from . import quantization  # noqa: F401, I001
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
