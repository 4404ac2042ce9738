"""The six IF stage pipelines (drop-in replacements for diffusers' classes of the same names) and the cascade over
them; importing it registers them with diffusers' AutoPipelines."""

from .auto_registration import register_when_imported
from .cascade import IFCascadePipeline
from .output import IFCascadePipelineOutput, IFPipelineOutput
from .pipeline_if import IFPipeline
from .pipeline_if_img2img import IFImg2ImgPipeline
from .pipeline_if_img2img_superresolution import IFImg2ImgSuperResolutionPipeline
from .pipeline_if_inpainting import IFInpaintingPipeline
from .pipeline_if_inpainting_superresolution import IFInpaintingSuperResolutionPipeline
from .pipeline_if_superresolution import IFSuperResolutionPipeline

__all__ = [
    "IFCascadePipeline",
    "IFCascadePipelineOutput",
    "IFImg2ImgPipeline",
    "IFImg2ImgSuperResolutionPipeline",
    "IFInpaintingPipeline",
    "IFInpaintingSuperResolutionPipeline",
    "IFPipeline",
    "IFPipelineOutput",
    "IFSuperResolutionPipeline",
]

register_when_imported()  # AutoPipelineFor{Text2Image,Image2Image,Inpainting} find our classes
