"""diffusers' AutoPipelines after `import if_diffusers` (pipelines/auto_registration.py): `from_pretrained` of our
folders and diffusers' DeepFloyd folders, and `from_pipe` between tasks, give our classes sharing the components."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

from if_diffusers import IFCascadePipeline, IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.pipelines.auto_registration import FAMILIES, TASK_MAPPINGS, register_auto_pipelines

AUTO = (AutoPipelineForText2Image, AutoPipelineForImage2Image, AutoPipelineForInpainting)
STAGE = {"if": "I", "if-super-resolution": "II"}
PROMPT = "a red circle on a blue background"


def _components(pipeline) -> dict:
    return {name: component for name, component in pipeline.components.items() if component is not None}


def _stage_images(pipeline, seed: int = 0) -> torch.Tensor:
    """2 steps of a stage pipeline in its own task, on fixed inputs: `(1, 3, H, W)` in `[-1, 1]`."""
    size = pipeline.unet.config.sample_size
    inputs = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=inputs) * 2 - 1
    kwargs = {}
    name = type(pipeline).__name__
    if "SuperResolution" in name:
        kwargs["image"] = torch.rand(1, 3, size // 4, size // 4, generator=inputs) * 2 - 1
        if "Img2Img" in name or "Inpainting" in name:
            kwargs["original_image"] = image
    elif "Img2Img" in name or "Inpainting" in name:
        kwargs["image"] = image
    if "Inpainting" in name:
        kwargs["mask_image"] = (torch.rand(1, 1, size, size, generator=inputs) > 0.5).float()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt=PROMPT, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                    **kwargs).images  # fmt: skip


@pytest.mark.parametrize("family", list(STAGE))
def test_auto_pipelines_load_our_folders_as_our_classes(pipeline_components, family, tmp_path):
    """A folder saved from any class of a family loads, through each AutoPipeline, as that task's class of ours
    with our UNet class; diffusers' own DeepFloyd folder (stage I) loads the same way."""
    stage = STAGE[family]
    unet_class = IFUNet2DConditionModel if stage == "I" else IFSuperResUNet2DConditionModel
    folders = []
    for saved_class in FAMILIES[family]:
        folders.append(tmp_path / saved_class.__name__)
        saved_class(**pipeline_components(stage)).save_pretrained(folders[-1])
    if family == "if":
        folders.append(tmp_path / "deepfloyd")
        diffusers.IFPipeline(**pipeline_components("I")).save_pretrained(folders[-1])
    for folder in folders:
        for auto, expected in zip(AUTO, FAMILIES[family]):
            loaded = auto.from_pretrained(folder)
            assert type(loaded) is expected and type(loaded.unet) is unet_class, (folder.name, auto.__name__)


def test_auto_pipelines_load_the_cascade(cascade_folder):
    for auto in AUTO:
        loaded = auto.from_pretrained(cascade_folder)
        assert type(loaded) is IFCascadePipeline and type(loaded.stage_1_unet) is IFUNet2DConditionModel


@pytest.mark.parametrize("family", list(STAGE))
def test_from_pipe_switches_tasks_over_the_same_components(pipeline_components, family):
    """text-to-image -> img2img -> inpainting -> text-to-image, through the AutoPipelines and through our classes'
    own `from_pipe`: our classes, the very component objects (nothing reloaded or copied), and each task's images
    equal to those of the task's class built from the components."""
    stage = STAGE[family]
    start = FAMILIES[family][0](**pipeline_components(stage))
    shared = _components(start)
    pipeline = start
    for auto, expected in [*zip(AUTO[1:], FAMILIES[family][1:]), (AUTO[0], FAMILIES[family][0])]:
        pipeline = auto.from_pipe(pipeline)
        assert type(pipeline) is expected
        assert all(pipeline.components[name] is component for name, component in shared.items())
        own = expected.from_pipe(start)
        assert type(own) is expected and own.unet is start.unet
        assert torch.equal(_stage_images(pipeline), _stage_images(expected(**pipeline_components(stage))))


def test_cascade_from_pipe_keeps_every_component(cascade_folder):
    """The cascade is one class for the three tasks (its inputs choose the mode): each AutoPipeline's `from_pipe`
    gives a cascade over the same component objects, stage III included."""
    cascade = IFCascadePipeline.from_pretrained(cascade_folder)
    shared = _components(cascade)
    assert "stage_3_unet" in shared
    pipeline = cascade
    for auto in (*AUTO[1:], AUTO[0]):
        pipeline = auto.from_pipe(pipeline)
        assert type(pipeline) is IFCascadePipeline
        assert all(pipeline.components[name] is component for name, component in shared.items())


def test_registration_survives_a_reload_and_a_second_call():
    """diffusers' `auto_pipeline` module rebuilt (a reload, as after a `find_spec` by tooling or a re-import) is
    registered again by the import hook; registering twice installs one reader and one hook."""
    import importlib
    import sys

    from diffusers.pipelines import auto_pipeline

    from if_diffusers.pipelines.auto_registration import _RegisterOnImport, register_when_imported

    importlib.util.find_spec(auto_pipeline.__name__)  # tooling's lookup does not use the hook up
    reloaded = importlib.reload(auto_pipeline)
    for task, mapping_name in enumerate(TASK_MAPPINGS):
        for family, classes in FAMILIES.items():
            assert getattr(reloaded, mapping_name)[family] is classes[task], (mapping_name, family)
    reader = vars(reloaded.AutoPipelineForText2Image)["_dict_from_json_file"]
    register_when_imported()
    register_auto_pipelines(reloaded)
    assert vars(reloaded.AutoPipelineForText2Image)["_dict_from_json_file"] is reader
    assert sum(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path) == 1
