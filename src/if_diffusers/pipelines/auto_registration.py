"""diffusers' AutoPipelines (`AutoPipelineForText2Image`, `...ForImage2Image`, `...ForInpainting`) over our classes,
registered by `import if_diffusers`.

diffusers finds a task's class by the pipeline's class *name* in its `AUTO_*_PIPELINES_MAPPING` tables, and ours
share their names with diffusers' IF pipelines, so registering points the `"if"` family at our stage-I classes
(diffusers' own DeepFloyd folders then load into them too, with our UNets) and adds two families diffusers lacks:
the super-resolution stage and the cascade (one class for the three tasks: its inputs choose the mode). The
AutoPipelines read `model_index.json` with diffusers' stock reader, which keeps our `_class_name` pair
`["if_diffusers_pipeline", "<Class>"]`; registering also makes them read it as the plain name, as our own classes do.

diffusers' `auto_pipeline` module imports most of diffusers' pipelines (a second on the CPU, and transformers' image
processors with their warnings), so `import if_diffusers` does not import it: `register_when_imported` registers
at once where it is already imported, and an import hook on `sys.meta_path` registers whenever it runs.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType
from typing import Any

from diffusers.configuration_utils import ConfigMixin

from .cascade import IFCascadePipeline
from .hub_layout import plain_class_name
from .pipeline_if import IFPipeline
from .pipeline_if_img2img import IFImg2ImgPipeline
from .pipeline_if_img2img_superresolution import IFImg2ImgSuperResolutionPipeline
from .pipeline_if_inpainting import IFInpaintingPipeline
from .pipeline_if_inpainting_superresolution import IFInpaintingSuperResolutionPipeline
from .pipeline_if_superresolution import IFSuperResolutionPipeline

# family -> (text-to-image, image-to-image, inpainting)
FAMILIES = {
    "if": (IFPipeline, IFImg2ImgPipeline, IFInpaintingPipeline),
    "if-super-resolution": (IFSuperResolutionPipeline, IFImg2ImgSuperResolutionPipeline,
                            IFInpaintingSuperResolutionPipeline),
    "if-cascade": (IFCascadePipeline, IFCascadePipeline, IFCascadePipeline),
}  # fmt: skip
AUTO_PIPELINES = ("AutoPipelineForText2Image", "AutoPipelineForImage2Image", "AutoPipelineForInpainting")
AUTO_PIPELINE_MODULE = "diffusers.pipelines.auto_pipeline"
TASK_MAPPINGS = ("AUTO_TEXT2IMAGE_PIPELINES_MAPPING", "AUTO_IMAGE2IMAGE_PIPELINES_MAPPING",
                 "AUTO_INPAINT_PIPELINES_MAPPING")  # fmt: skip


def register_when_imported() -> None:
    """`register_auto_pipelines` now if diffusers' `auto_pipeline` module is imported, and each time it runs."""
    if AUTO_PIPELINE_MODULE in sys.modules:
        register_auto_pipelines(sys.modules[AUTO_PIPELINE_MODULE])
    if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def register_auto_pipelines(auto_pipeline: ModuleType) -> None:
    """Put our classes in the task tables of diffusers' `auto_pipeline` module and let its AutoPipelines read our
    `_class_name` pair. Idempotent: a second call changes nothing."""
    for task, mapping_name in enumerate(TASK_MAPPINGS):
        mapping = getattr(auto_pipeline, mapping_name)
        for family, classes in FAMILIES.items():
            mapping[family] = classes[task]
    for name in AUTO_PIPELINES:
        auto_class = getattr(auto_pipeline, name)
        if "_dict_from_json_file" not in vars(auto_class):
            auto_class._dict_from_json_file = classmethod(_reading_plain_class_name)


def _reading_plain_class_name(cls, json_file, **kwargs: Any) -> dict[str, Any]:
    """ConfigMixin's reader of `model_index.json` (`kwargs`: what the installed diffusers passes), with our pair read
    as the plain class name."""
    return plain_class_name(ConfigMixin._dict_from_json_file.__func__(cls, json_file, **kwargs))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for diffusers' `auto_pipeline` module it takes the spec the other finders give and
    wraps its loader, so that our classes are registered each time the module runs (its first import, a reload).
    Stays on `sys.meta_path`: a `find_spec` without an import (tooling) does not use it up."""

    def find_spec(self, name: str, path, target=None):
        if name != AUTO_PIPELINE_MODULE:
            return None
        others = (finder for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec"))
        spec = next((found for finder in others for found in [finder.find_spec(name, path, target)] if found), None)
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _RegisteringLoader):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """`loader` (the module's own), with `register_auto_pipelines` once the module has run."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register_auto_pipelines(module)

    def __getattr__(self, name: str):  # get_source, get_filename, ...: the module's own loader answers
        return getattr(self.loader, name)
