"""The hub layout (`pipelines/hub_layout.py`): what `save_pretrained` writes, that diffusers' loader rebuilds our
classes from it with `trust_remote_code`, that our classes load it without, that diffusers' own DeepFloyd folders
load with our UNet classes (loading options included), for local folders and hub ids (an offline hub cache)."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import shutil
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import tiny_unet
from diffusers import DiffusionPipeline, UNet2DConditionModel
from packaging.version import Version

import if_diffusers
from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.installed_versions import dtype_argument
from if_diffusers.pipelines.hub_layout import (
    CUSTOM_COMPONENT_MODULE,
    CUSTOM_COMPONENT_SOURCE,
    CUSTOM_PIPELINE_MODULE,
    CUSTOM_PIPELINE_SOURCE,
    HubLayoutMixin,
    _plugin_classes,
)

PROMPT = "a red circle on a blue background"
STYLE_PROMPT = "a small green square at the top left"
TOLERANCE = 1e-4  # max abs against diffusers' own pipeline, float32 (as test_pipeline_parity)
DIFFUSERS = Version(diffusers.__version__)


def _images(seed: int, size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(seed: int, size: int) -> torch.Tensor:
    return (torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


# pipeline -> (stage, its image arguments)
CASES = {
    "IFPipeline": ("I", {}),
    "IFImg2ImgPipeline": ("I", dict(image=_images(1, 16), strength=0.5)),
    "IFInpaintingPipeline": ("I", dict(image=_images(2, 16), mask_image=_mask(3, 16))),
    "IFSuperResolutionPipeline": ("II", dict(image=_images(4, 8))),
    "IFImg2ImgSuperResolutionPipeline": ("II", dict(image=_images(5, 8), original_image=_images(6, 32))),
    "IFInpaintingSuperResolutionPipeline": ("II", dict(image=_images(7, 8), original_image=_images(8, 32),
                                                       mask_image=_mask(9, 32))),
}  # fmt: skip
PLUGIN_UNET = {"I": IFUNet2DConditionModel, "II": IFSuperResUNet2DConditionModel}


def _run(pipeline, name: str, **kwargs) -> torch.Tensor:
    """`(1, 3, H, W)` images in `[-1, 1]`: 2 steps on the case's inputs, seed 0."""
    pipeline.set_progress_bar_config(disable=True)
    arguments = dict(CASES[name][1], prompt=PROMPT, num_inference_steps=2, output_type="pt")
    arguments.update(kwargs)
    return pipeline(**arguments, generator=torch.Generator().manual_seed(0)).images


def _stock(unet) -> UNet2DConditionModel:
    """diffusers' own class with `unet`'s weights and its config keys only (diffusers would keep and save our extra
    keys in a stock model's config, which DeepFloyd's folders do not have)."""
    stock_keys = inspect.signature(UNet2DConditionModel.__init__).parameters
    stock = UNet2DConditionModel.from_config({k: v for k, v in unet.config.items() if k in stock_keys})
    stock.load_state_dict(unet.state_dict())
    return stock.eval()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def _index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def _to_hub_cache(folder: Path, cache_dir: Path, repo_id: str = "someone/tiny-if") -> str:
    """Put `folder` in `cache_dir` as huggingface_hub caches a downloaded repo (refs/main, snapshots/<commit>/, and
    the tree listing trees/<commit>.json that offline loading reads), so that `from_pretrained(repo_id,
    cache_dir=cache_dir, local_files_only=True)` runs diffusers' hub code path (`download`) with no network."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, storage / "snapshots" / commit)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "blob_id": hashlib.sha1(p.read_bytes()).hexdigest()}
             for p in folder.rglob("*") if p.is_file()}  # fmt: skip
    (storage / "trees").mkdir()
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return repo_id


def _deepfloyd_folder(pipeline_components, name: str, folder: Path) -> Path:
    """What `diffusers.<name>(...).save_pretrained` writes from diffusers' `UNet2DConditionModel` with the same
    weights as the fixture's (our class's) UNet: DeepFloyd's layout on the Hub."""
    stage = CASES[name][0]
    components = pipeline_components(stage)
    getattr(diffusers, name)(**dict(components, unet=_stock(components["unet"]))).save_pretrained(folder)
    assert _index(folder)["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert "noise_augmentation_beta_schedule" not in json.loads((folder / "unet" / "config.json").read_text())
    return folder


# --- what save_pretrained writes, and the two loaders ---------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_saved_folder_loads_with_ours_and_with_diffusers_trusting_its_code(pipeline_components, name, tmp_path):
    """The folder holds `if_diffusers_pipeline.py` and names it with the class in `model_index.json`; our class
    loads it without `trust_remote_code`, diffusers' `DiffusionPipeline` with it, and both give back our pipeline and
    UNet classes and the same images as the saved object."""
    stage = CASES[name][0]
    pipeline = getattr(if_diffusers, name)(**pipeline_components(stage))
    pipeline.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / f"{CUSTOM_PIPELINE_MODULE}.py").read_text() == CUSTOM_PIPELINE_SOURCE
    index = _index(tmp_path / "saved")
    assert index["_class_name"] == [CUSTOM_PIPELINE_MODULE, name]
    assert index["unet"] == [CUSTOM_COMPONENT_MODULE, PLUGIN_UNET[stage].__name__]
    assert (tmp_path / "saved" / "unet" / f"{CUSTOM_COMPONENT_MODULE}.py").read_text() == CUSTOM_COMPONENT_SOURCE
    # a T5 tokenizer that transformers 4 and 5 both load (transformers 5 saves tokenizer.json alone)
    assert index["tokenizer"] == ["transformers", "T5TokenizerFast"]
    assert (
        json.loads((tmp_path / "saved" / "tokenizer" / "tokenizer_config.json").read_text()).get(
            "extra_special_tokens"
        )
        != []
    )
    assert _leftovers(tmp_path / "saved") == []

    expected = _run(pipeline, name)
    ours = getattr(if_diffusers, name).from_pretrained(tmp_path / "saved")
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    for loaded in (ours, theirs):
        assert type(loaded) is getattr(if_diffusers, name) and type(loaded.unet) is PLUGIN_UNET[stage]
        assert torch.equal(_run(loaded, name), expected)


def test_the_bundled_demo_folder_is_in_the_layout_save_pretrained_writes():
    """The demo model shipped in the package carries the same files and names as a save writes today."""
    from if_diffusers.demo_cascade import bundled_model_path

    folder = bundled_model_path()
    index = _index(folder)
    assert (folder / f"{CUSTOM_PIPELINE_MODULE}.py").read_text() == CUSTOM_PIPELINE_SOURCE
    for name in ("stage_1_unet", "stage_2_unet"):
        assert index[name][0] == CUSTOM_COMPONENT_MODULE
        assert (folder / name / f"{CUSTOM_COMPONENT_MODULE}.py").read_text() == CUSTOM_COMPONENT_SOURCE
    assert index["tokenizer"] == ["transformers", "T5TokenizerFast"]


def test_diffusers_loader_without_trust_remote_code(pipeline_components, tmp_path):
    """From diffusers 0.38 its loaders refuse the folder's file without `trust_remote_code`: `DiffusionPipeline`,
    and diffusers' own `IFPipeline` too (its loader resolves a [file, class] `_class_name` for subclasses as well).
    Before 0.38 diffusers ran a local folder's code unasked: both build our class."""
    if_diffusers.IFPipeline(**pipeline_components("I")).save_pretrained(tmp_path / "saved")
    for loader in (DiffusionPipeline, diffusers.IFPipeline):
        if DIFFUSERS < Version("0.38"):
            assert type(loader.from_pretrained(tmp_path / "saved")) is if_diffusers.IFPipeline
            continue
        with pytest.raises(
            ValueError, match=f"(?s)custom code in {CUSTOM_PIPELINE_MODULE}.py.*trust_remote_code=True"
        ):
            loader.from_pretrained(tmp_path / "saved")


def test_custom_pipeline_file_without_if_diffusers_says_pip_install(pipeline_components, tmp_path, monkeypatch):
    """With `if_diffusers` not importable, the file diffusers imports raises an ImportError that names the package
    to install, and a class the installed package lacks is named with the upgrade to make."""
    if_diffusers.IFPipeline(**pipeline_components("I")).save_pretrained(tmp_path / "saved")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "if_diffusers", None)  # `import if_diffusers` raises ModuleNotFoundError
        # diffusers < 0.36 checks the file's imports before running it, with its own error naming the package
        message = (
            "needs the if-diffusers package: pip install if-diffusers"
            if DIFFUSERS >= Version("0.36")
            else "pip install if_diffusers"
        )
        with pytest.raises(ImportError, match=message):
            DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)

    index = _index(tmp_path / "saved")
    (tmp_path / "saved" / "model_index.json").write_text(json.dumps({**index, "_class_name": [CUSTOM_PIPELINE_MODULE, "IFNewPipeline"]}))  # fmt: skip
    with pytest.raises(AttributeError, match=r"no 'IFNewPipeline'.*pip install -U if-diffusers"):
        DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)


def test_converted_folder_loads_through_diffusers(converted):
    """A conversion writes the layout (it calls `save_pretrained`): diffusers' loader builds our pipeline from it,
    with the same images as our class's loader."""
    folder = converted("base")[1]
    assert _index(folder)["_class_name"] == [CUSTOM_PIPELINE_MODULE, "IFPipeline"]
    theirs = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(theirs) is if_diffusers.IFPipeline and type(theirs.unet) is IFUNet2DConditionModel
    # the converted folder has no text encoder: T5 embeddings `(1, 5, 24)` stand in for the prompt
    embeds = torch.randn(2, 1, 5, 24, generator=torch.Generator().manual_seed(1))
    images = [
        _run(pipeline, "IFPipeline", prompt=None, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
        for pipeline in (theirs, if_diffusers.IFPipeline.from_pretrained(folder))
    ]
    assert torch.equal(*images)


# --- saving all at once ---------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_folder(pipeline_components, tmp_path, monkeypatch):
    """A save that fails part way leaves the folder of the previous save as it was (or no folder), and nothing
    half-written beside it; a successful save replaces the folder's contents."""
    components = pipeline_components("I")
    pipeline = if_diffusers.IFPipeline(**dict(components, unet=copy.deepcopy(components["unet"])))
    pipeline.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "stale.txt").write_text("from before")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "saved").rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline.unet, "save_pretrained", disk_full)
    for target in (tmp_path / "saved", tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            pipeline.save_pretrained(target)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "saved").rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path / "saved") == []

    monkeypatch.undo()
    pipeline.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "stale.txt").exists() and _leftovers(tmp_path / "saved") == []


def test_save_refuses_a_folder_that_is_not_a_pipeline(pipeline_components, tmp_path):
    """A save replaces the whole folder, so a non-empty folder without `model_index.json` (a project, a home folder)
    or a file is refused before anything is written."""
    pipeline = if_diffusers.IFPipeline(**pipeline_components("I"))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"save_directory=.*project' is a non-empty folder without model_index.json"):
        pipeline.save_pretrained(tmp_path / "project")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=r"save_directory=.*file' is a file; expected a folder"):
        pipeline.save_pretrained(tmp_path / "file")
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine" and _leftovers(tmp_path / "project") == []


# --- diffusers' own DeepFloyd layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_deepfloyd_layout_loads_with_our_unet_classes(pipeline_components, name, tmp_path):
    """A folder in diffusers' layout (`["diffusers", "UNet2DConditionModel"]`) loads into our class with our UNet
    class: the same images as our pipeline built from our UNet with the same weights, within float32 rounding of
    diffusers' own pipeline on the same folder (with its float32 schedule), and style prompts (which need our UNet)
    work. The super-resolution UNet's extra config keys take their defaults, IF's noising schedule."""
    stage = CASES[name][0]
    folder = _deepfloyd_folder(pipeline_components, name, tmp_path / "deepfloyd")
    ours = getattr(if_diffusers, name).from_pretrained(folder)
    assert type(ours) is getattr(if_diffusers, name) and type(ours.unet) is PLUGIN_UNET[stage]
    built = getattr(if_diffusers, name)(**pipeline_components(stage))
    assert torch.equal(_run(ours, name), _run(built, name))

    # watermarker=None: diffusers' IFImg2ImgSuperResolutionPipeline (alone) lacks it in `_optional_components` and
    # cannot load its own folder saved without one
    theirs = getattr(diffusers, name).from_pretrained(folder, watermarker=None)
    assert type(theirs.unet) is UNet2DConditionModel
    assert (_run(ours, name, float64_schedule=False) - _run(theirs, name)).abs().max() < TOLERANCE

    styled = _run(ours, name, style_prompt=STYLE_PROMPT)
    assert torch.equal(styled, _run(built, name, style_prompt=STYLE_PROMPT))
    assert not torch.equal(styled, _run(ours, name))
    if stage == "II":
        assert ours.unet.config.noise_augmentation_num_train_timesteps == 1000
        assert torch.equal(ours.unet.noise_augmentation_alphas_cumprod, ours.image_noising_scheduler.alphas_cumprod)


def test_loading_options_reach_our_unet(pipeline_components, tmp_path):
    """`variant` and `torch_dtype` (also per component) reach the UNet that a DeepFloyd folder loads as our class;
    a UNet passed by the user is used as given."""
    components = pipeline_components("I")
    folder = _deepfloyd_folder(pipeline_components, "IFPipeline", tmp_path / "deepfloyd")
    half = _stock(tiny_unet("I", seed=1)).half()  # other weights: the variant file, not the float32 one, is read
    half.save_pretrained(folder / "unet", variant="fp16")

    loaded = if_diffusers.IFPipeline.from_pretrained(folder, variant="fp16", **dtype_argument(torch.float16))
    assert type(loaded.unet) is IFUNet2DConditionModel and loaded.unet.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), half.state_dict().values()))
    assert loaded.text_encoder.dtype == torch.float16

    mixed = if_diffusers.IFPipeline.from_pretrained(
        folder, **dtype_argument({"unet": torch.bfloat16, "default": torch.float32})
    )
    assert type(mixed.unet) is IFUNet2DConditionModel and mixed.unet.dtype == torch.bfloat16
    assert mixed.text_encoder.dtype == torch.float32

    stock = _stock(components["unet"])
    assert if_diffusers.IFPipeline.from_pretrained(folder, unet=stock).unet is stock


# --- hub ids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ours", "deepfloyd"])
def test_hub_ids_load_into_our_classes(pipeline_components, layout, tmp_path):
    """A hub id goes through diffusers' `download` (here from an offline hub cache): our classes load our layout and
    DeepFloyd's with our UNet class and the same images. (diffusers' `download` would otherwise ask for
    `trust_remote_code` and reject the module path that names our UNet class.)"""
    folder = tmp_path / layout
    if layout == "ours":
        if_diffusers.IFImg2ImgPipeline(**pipeline_components("I")).save_pretrained(folder)
    else:
        _deepfloyd_folder(pipeline_components, "IFImg2ImgPipeline", folder)
    repo_id = _to_hub_cache(folder, tmp_path / "cache")
    expected = _run(if_diffusers.IFImg2ImgPipeline(**pipeline_components("I")), "IFImg2ImgPipeline")
    for name in ("IFImg2ImgPipeline", "IFPipeline"):  # the class the folder names, and another one
        loaded = getattr(if_diffusers, name).from_pretrained(repo_id, cache_dir=tmp_path / "cache",
                                                             local_files_only=True)  # fmt: skip
        assert type(loaded) is getattr(if_diffusers, name) and type(loaded.unet) is IFUNet2DConditionModel
        assert torch.equal(_run(if_diffusers.IFImg2ImgPipeline.from_pipe(loaded), "IFImg2ImgPipeline"), expected)


# --- any pipeline class (the cascade's stages) -----------------------------------------------------------------


class _ThreeStages(HubLayoutMixin, DiffusionPipeline):
    """Components named as a cascade names them; stage III is a stock UNet that must stay stock."""

    def __init__(
        self,
        stage_1_unet: IFUNet2DConditionModel | UNet2DConditionModel,
        stage_2_unet: IFSuperResUNet2DConditionModel | UNet2DConditionModel,
        stage_3_unet: UNet2DConditionModel | None,
    ):
        super().__init__()
        self.register_modules(stage_1_unet=stage_1_unet, stage_2_unet=stage_2_unet, stage_3_unet=stage_3_unet)


def test_plugin_components_come_from_the_type_hints(tmp_path):
    """The mixin names no component: the hints of any pipeline class choose which UNets load as our classes, and a
    stock-only hint keeps diffusers' class."""
    assert _plugin_classes(_ThreeStages) == {
        "stage_1_unet": (IFUNet2DConditionModel, UNet2DConditionModel),
        "stage_2_unet": (IFSuperResUNet2DConditionModel, UNet2DConditionModel),
    }
    unets = {"stage_1_unet": tiny_unet("I"), "stage_2_unet": tiny_unet("II"), "stage_3_unet": tiny_unet("I", seed=2)}
    _ThreeStages(**{k: _stock(v) for k, v in unets.items()}).save_pretrained(tmp_path / "stock")
    assert all(_index(tmp_path / "stock")[k] == ["diffusers", "UNet2DConditionModel"] for k in unets)
    loaded = _ThreeStages.from_pretrained(tmp_path / "stock")
    assert type(loaded.stage_1_unet) is IFUNet2DConditionModel
    assert type(loaded.stage_2_unet) is IFSuperResUNet2DConditionModel
    assert type(loaded.stage_3_unet) is UNet2DConditionModel
    for name, unet in unets.items():
        assert all(
            torch.equal(a, b) for a, b in zip(getattr(loaded, name).state_dict().values(), unet.state_dict().values())
        )


def test_an_ambiguous_hint_is_refused():
    class TwoPlugins(HubLayoutMixin, DiffusionPipeline):
        def __init__(self, unet: IFUNet2DConditionModel | IFSuperResUNet2DConditionModel | UNet2DConditionModel):
            super().__init__()

    with pytest.raises(TypeError, match="TwoPlugins.__init__ hints unet: .* names 2 subclass pairs"):
        _plugin_classes(TwoPlugins)
