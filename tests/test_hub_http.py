"""Loading from and pushing to the Hub over real HTTP: the tests' Hub on localhost (tests/local_hub.py) serves
folders written by our `save_pretrained` and diffusers' own DeepFloyd layout to the unpatched huggingface_hub,
diffusers and transformers clients, starting each load from an empty cache. What was served is asserted from the
server's log."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import diffusers
import pytest
import torch
from conftest import tiny_unet
from diffusers import AutoPipelineForImage2Image, DiffusionPipeline, StableDiffusionUpscalePipeline
from test_hub_layout import CASES, PLUGIN_UNET, _deepfloyd_folder, _run

import if_diffusers
from if_diffusers import IFCascadePipeline, IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from if_diffusers.installed_versions import TRANSFORMERS_5
from if_diffusers.pipelines.hub_access import HubAccessError

PROMPT = "a red circle on a blue background"
CASCADE_STEPS = dict(stage_1_num_inference_steps=2, stage_2_num_inference_steps=2, stage_3_num_inference_steps=2)
CASCADE_UNETS = {"stage_1_unet": IFUNet2DConditionModel, "stage_2_unet": IFSuperResUNet2DConditionModel,
                 "stage_3_unet": diffusers.UNet2DConditionModel}  # fmt: skip

# Runs in a fresh interpreter that has never imported if_diffusers: diffusers' generic loader alone, as a Hub user
# calls it, on each repo of argv[1] (a torch file {repo: call keywords}); writes {repo: (classes, images)} to argv[2].
FRESH_PROCESS = """
import sys
import torch
from diffusers import DiffusionPipeline

assert "if_diffusers" not in sys.modules
torch.set_num_threads(1)  # as the tests' process (conftest.py): the same arithmetic, equal images
results = {}
for repo, call in torch.load(sys.argv[1]).items():
    pipeline = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    classes = {name: f"{type(c).__module__}.{type(c).__name__}" for name, c in pipeline.components.items()
               if name == "unet" or name.endswith("_unet")}
    classes["pipeline"] = f"{type(pipeline).__module__}.{type(pipeline).__name__}"
    images = pipeline(**call, generator=torch.Generator().manual_seed(0)).images
    results[repo] = (classes, images)
# if_diffusers, imported by the repos' files, registers with the AutoPipelines when their module is first imported
results["auto_pipeline imported"] = "diffusers.pipelines.auto_pipeline" in sys.modules
from diffusers import AutoPipelineForInpainting
inpainting = AutoPipelineForInpainting.from_pipe(DiffusionPipeline.from_pretrained("tests/IFPipeline",
                                                                                   trust_remote_code=True))
results["from_pipe"] = f"{type(inpainting).__module__}.{type(inpainting).__name__}"
torch.save(results, sys.argv[2])
"""


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def _cascade_images(pipeline) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt=PROMPT, **CASCADE_STEPS, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images


def _weights(served: list[str]) -> list[str]:
    return sorted(path for path in served if path.endswith(".safetensors"))


@pytest.fixture(scope="module")
def saved_repos(pipeline_components, cascade_folder, local_hub, tmp_path_factory):
    """Each of the six stage pipelines and the tiny cascade saved by our `save_pretrained` and served as
    `tests/<Class>`: {class name: (repo id, local folder)}."""
    root = tmp_path_factory.mktemp("saved_repos")
    repos = {}
    for name, (stage, _) in CASES.items():
        getattr(if_diffusers, name)(**pipeline_components(stage)).save_pretrained(root / name)
        repos[name] = (f"tests/{name}", root / name)
    repos["IFCascadePipeline"] = ("tests/IFCascadePipeline", cascade_folder)
    for repo_id, folder in repos.values():
        local_hub.add_repo(repo_id, folder)
    return repos


def test_generic_loader_in_a_fresh_process_builds_every_class(saved_repos, tmp_path):
    """`DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` over HTTP, with an empty cache, in a process
    that never imported if_diffusers: every pipeline class and the cascade, with our UNet classes, and images equal
    to those of the local folder loaded by our class. diffusers' AutoPipelines, imported afterwards, know our
    classes."""
    calls, expected = {}, {}
    for name, (repo_id, folder) in saved_repos.items():
        local = getattr(if_diffusers, name).from_pretrained(folder)
        if name == "IFCascadePipeline":
            calls[repo_id] = dict(prompt=PROMPT, **CASCADE_STEPS, output_type="pt")
            expected[repo_id] = ({**{k: _qualified(v) for k, v in CASCADE_UNETS.items()},
                                  "pipeline": _qualified(IFCascadePipeline)}, _cascade_images(local))  # fmt: skip
        else:
            calls[repo_id] = dict(CASES[name][1], prompt=PROMPT, num_inference_steps=2, output_type="pt")  # fmt: skip
            expected[repo_id] = ({"unet": _qualified(PLUGIN_UNET[CASES[name][0]]),
                                  "pipeline": _qualified(getattr(if_diffusers, name))}, _run(local, name))  # fmt: skip
    torch.save(calls, tmp_path / "calls.pt")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, tmp_path / "calls.pt", tmp_path / "results.pt"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    assert not results.pop("auto_pipeline imported")  # `import if_diffusers` leaves that heavy module alone
    assert results.pop("from_pipe") == _qualified(if_diffusers.IFInpaintingPipeline)
    for repo_id, (classes, images) in expected.items():
        assert results[repo_id][0] == classes, repo_id
        assert torch.equal(results[repo_id][1], images), repo_id


@pytest.mark.parametrize("name", list(CASES))
def test_our_classes_load_hub_repos_without_their_code(saved_repos, local_hub, name, tmp_path):
    """`if_diffusers.<Class>.from_pretrained(repo)` over HTTP, without `trust_remote_code`: our classes, the local
    folder's images, and no code file downloaded. An AutoPipeline loads the repo as our class too."""
    repo_id, folder = saved_repos[name]
    local_hub.clear_log()
    loaded = getattr(if_diffusers, name).from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert type(loaded) is getattr(if_diffusers, name) and type(loaded.unet) is PLUGIN_UNET[CASES[name][0]]
    assert torch.equal(_run(loaded, name), _run(getattr(if_diffusers, name).from_pretrained(folder), name))
    served = local_hub.downloaded(repo_id)
    assert not [path for path in served if path.endswith(".py")] and "model_index.json" in served
    assert _weights(served) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    if name == "IFImg2ImgPipeline":
        auto = AutoPipelineForImage2Image.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
        assert type(auto) is if_diffusers.IFImg2ImgPipeline


def test_cascade_from_three_repos_downloads_t5_once(pipeline_components, tiny_upscaler, local_hub, tmp_path):
    """`from_pretrained_stages` over three repos (stage II's repo has a T5 too, as DeepFloyd's do): T5's weights
    come from stage I's repo only, and the images equal the cascade of the three local folders."""
    folders = {"stage_1": tmp_path / "one", "stage_2": tmp_path / "two", "stage_3": tmp_path / "three"}
    if_diffusers.IFPipeline(**pipeline_components("I")).save_pretrained(folders["stage_1"])
    if_diffusers.IFSuperResolutionPipeline(**pipeline_components("II")).save_pretrained(folders["stage_2"])
    StableDiffusionUpscalePipeline(**tiny_upscaler).save_pretrained(folders["stage_3"])
    repos = {stage: f"three/{stage}" for stage in folders}
    for stage, folder in folders.items():
        local_hub.add_repo(repos[stage], folder)
    local_hub.clear_log()
    cascade = IFCascadePipeline.from_pretrained_stages(*repos.values(), cache_dir=tmp_path / "cache")
    assert local_hub.downloaded(repos["stage_1"]).count("text_encoder/model.safetensors") == 1
    assert _weights(local_hub.downloaded(repos["stage_2"])) == ["unet/diffusion_pytorch_model.safetensors"]
    local = IFCascadePipeline.from_pretrained_stages(*folders.values())
    assert torch.equal(_cascade_images(cascade), _cascade_images(local))


@pytest.mark.parametrize("name", ["IFPipeline", "IFInpaintingSuperResolutionPipeline"])
def test_deepfloyd_layout_over_http_loads_into_our_classes(pipeline_components, local_hub, name, tmp_path):
    """diffusers' own layout (`["diffusers", "UNet2DConditionModel"]`, no code files) served as a hub repo loads
    into our class with our UNet class and the local folder's images."""
    folder = _deepfloyd_folder(pipeline_components, name, tmp_path / "deepfloyd")
    repo_id = f"deepfloyd/{name}"
    local_hub.add_repo(repo_id, folder)
    loaded = getattr(if_diffusers, name).from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert type(loaded.unet) is PLUGIN_UNET[CASES[name][0]]
    assert torch.equal(_run(loaded, name), _run(getattr(if_diffusers, name).from_pretrained(folder), name))


def test_variant_and_revision_download_what_they_name(pipeline_components, local_hub, tmp_path):
    """A repo with float32 and fp16 weights: `variant="fp16"` downloads the fp16 files only (and loads their
    values); `revision=` a named branch loads that branch's weights."""
    components = pipeline_components("I")
    if_diffusers.IFPipeline(**components).save_pretrained(tmp_path / "both")
    halves = dict(unet=copy.deepcopy(components["unet"]).half(), text_encoder=copy.deepcopy(components["text_encoder"]).half())  # fmt: skip
    if_diffusers.IFPipeline(**dict(components, **halves)).save_pretrained(tmp_path / "half", variant="fp16")
    for path in (tmp_path / "half").rglob("*.fp16.safetensors"):
        shutil.copy(path, tmp_path / "both" / path.relative_to(tmp_path / "half"))
    repo_id = "variants/tiny-if"
    local_hub.add_repo(repo_id, tmp_path / "both")
    local_hub.clear_log()
    loaded = if_diffusers.IFPipeline.from_pretrained(repo_id, variant="fp16", cache_dir=tmp_path / "cache")
    assert _weights(local_hub.downloaded(repo_id)) == ["text_encoder/model.fp16.safetensors",
                                                       "unet/diffusion_pytorch_model.fp16.safetensors"]  # fmt: skip
    for name, half in halves.items():
        values = zip(getattr(loaded, name).state_dict().values(), half.state_dict().values())
        assert all(torch.equal(a, b.to(a.dtype)) for a, b in values), name

    retrained = tiny_unet("I", seed=7)
    if_diffusers.IFPipeline(**dict(components, unet=retrained)).save_pretrained(tmp_path / "branch")
    local_hub.add_branch(repo_id, "retrained", tmp_path / "branch")
    loaded = if_diffusers.IFPipeline.from_pretrained(repo_id, revision="retrained", cache_dir=tmp_path / "cache")
    values = zip(loaded.unet.state_dict().values(), retrained.state_dict().values())
    assert all(torch.equal(a, b) for a, b in values)


def test_our_cascade_and_the_command_line_load_a_cascade_repo(saved_repos, tmp_path, capsys):
    """`IFCascadePipeline.from_pretrained(repo)` and `if-diffusers generate --model REPO` over HTTP give the local
    folder's images."""
    from PIL import Image

    from if_diffusers import cli

    repo_id, folder = saved_repos["IFCascadePipeline"]
    # tokenizers transformers 4 and 5 both load: transformers 5 saves tokenizer.json alone, which transformers 4
    # reads through the Fast classes (the tests' CLIP tokenizer, built from files under transformers 4, saves them)
    index = json.loads((folder / "model_index.json").read_text())
    clip = "CLIPTokenizerFast" if TRANSFORMERS_5 else "CLIPTokenizer"
    assert (index["tokenizer"], index["stage_3_tokenizer"]) == (["transformers", "T5TokenizerFast"],
                                                                ["transformers", clip])  # fmt: skip
    loaded = IFCascadePipeline.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert type(loaded.stage_2_unet) is IFSuperResUNet2DConditionModel
    assert torch.equal(_cascade_images(loaded), _cascade_images(IFCascadePipeline.from_pretrained(folder)))
    for source, output in ((repo_id, "hub.png"), (str(folder), "folder.png")):
        assert cli.main(["generate", PROMPT, "--model", source, "--steps", "2", "-o", str(tmp_path / output)]) == 0
    capsys.readouterr()
    hub, local = (Image.open(tmp_path / name) for name in ("hub.png", "folder.png"))
    assert hub.size == (256, 256) and hub.tobytes() == local.tobytes()


# --- refused repos ---------------------------------------------------------------------------------------------


def test_gated_missing_and_unknown_revision_give_one_clear_error(pipeline_components, local_hub, tmp_path, capsys):
    """A gated repo, a missing one, a missing revision and a token the Hub rejects each raise one HubAccessError
    naming the argument, the repo and what to do, before any file is downloaded; once the licence is accepted the
    same cache loads."""
    folder = tmp_path / "gated"
    if_diffusers.IFPipeline(**pipeline_components("I")).save_pretrained(folder)
    repo_id = "gated/tiny-if"
    local_hub.add_repo(repo_id, folder, gated=True)
    cache = tmp_path / "cache"
    local_hub.clear_log()
    refused = [
        (lambda: if_diffusers.IFPipeline.from_pretrained(repo_id, cache_dir=cache),
         r"pretrained_model_name_or_path='gated/tiny-if' is gated \(HTTP 401\): accept its licence at .*/gated/tiny-if"
         r" while logged in to the Hub, then log in with `hf auth login`"),
        (lambda: IFCascadePipeline.from_pretrained_stages(repo_id, repo_id, cache_dir=cache),
         r"stage_1='gated/tiny-if' is gated"),
        (lambda: if_diffusers.IFPipeline.from_pretrained("gated/no-such-repo", cache_dir=cache),
         r"'gated/no-such-repo' is not a local folder and not a repo the Hub serves \(HTTP 40[14]\): check the id"),
        (lambda: if_diffusers.IFPipeline.from_pretrained(repo_id, revision="nope", cache_dir=cache),
         None),
    ]  # fmt: skip
    local_hub.set_gated(repo_id, False)
    with pytest.raises(HubAccessError, match=r"'gated/tiny-if' has no revision 'nope' \(HTTP 404\)"):
        refused[3][0]()
    local_hub.set_gated(repo_id, True)
    for load, message in refused[:3]:
        with pytest.raises(HubAccessError, match=message) as error:
            load()
        assert error.value.__cause__ is None and error.value.__suppress_context__
    with pytest.raises(
        HubAccessError, match=r"'gated/tiny-if' is gated \(HTTP 403\)"
    ):  # a token that has not accepted
        if_diffusers.IFPipeline.from_pretrained(repo_id, cache_dir=cache, token="hf_not_accepted")
    with pytest.raises(HubAccessError, match=r"'gated/tiny-if': the Hub rejected the token \(HTTP 401: Invalid "
                                             r"credentials in Authorization header\); log in with `hf auth login`"):  # fmt: skip
        if_diffusers.IFPipeline.from_pretrained(repo_id, cache_dir=cache, token="hf_revoked")
    assert local_hub.downloaded(repo_id) == []

    from if_diffusers import cli

    assert cli.main(["generate", "a red circle", "--model", repo_id, "-o", str(tmp_path / "x.png")]) == 1
    printed = capsys.readouterr().err.strip().splitlines()
    assert printed[-1].startswith("error: --model='gated/tiny-if' is gated (HTTP 401)"), printed

    local_hub.set_gated(repo_id, False)
    loaded = if_diffusers.IFPipeline.from_pretrained(repo_id, cache_dir=cache)
    assert type(loaded.unet) is IFUNet2DConditionModel


def test_an_unreachable_hub_is_named_unless_the_cache_holds_the_repo(pipeline_components, local_hub, tmp_path):
    """No answer from the Hub (a process whose HF_ENDPOINT is a port nothing listens on): a repo in the cache loads
    from it; one that is not fails at once with one line saying so (diffusers would retry, then say the repo has no
    model_index.json)."""
    folder = tmp_path / "repo"
    if_diffusers.IFPipeline(**pipeline_components("I")).save_pretrained(folder)
    local_hub.add_repo("offline/tiny-if", folder)
    cache = tmp_path / "cache"
    if_diffusers.IFPipeline.from_pretrained("offline/tiny-if", cache_dir=cache)
    script = f"""
import pytest
from if_diffusers import IFPipeline
from if_diffusers.pipelines.hub_access import HubAccessError
assert type(IFPipeline.from_pretrained("offline/tiny-if", cache_dir={str(cache)!r})).__name__ == "IFPipeline"
with pytest.raises(HubAccessError) as error:
    IFPipeline.from_pretrained("offline/other", cache_dir={str(cache)!r})
print(error.value)
"""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: nothing answers there
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.strip()
        .splitlines()[-1]
        .startswith("pretrained_model_name_or_path='offline/other': the Hub at http://127.0.0.1:9 cannot be reached (")
        and "and the repo is not in the cache" in done.stdout
    ), done.stdout


# --- pushing ---------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_a_repo_the_generic_loader_reads(pipeline_components, local_hub, tmp_path):
    """`save_pretrained(..., push_to_hub=True)` uploads the whole folder (code files included) to the local Hub,
    and diffusers' generic loader builds our class from the pushed repo with the saved pipeline's images."""
    pipeline = if_diffusers.IFImg2ImgPipeline(**pipeline_components("I"))
    pipeline.save_pretrained(tmp_path / "tiny-if-pushed", push_to_hub=True, repo_id="me/tiny-if-pushed",
                             token="hf_local_test")  # fmt: skip
    pushed = local_hub.repo_folder("me/tiny-if-pushed")
    local = sorted(p.relative_to(tmp_path / "tiny-if-pushed").as_posix() for p in (tmp_path / "tiny-if-pushed").rglob("*") if p.is_file())  # fmt: skip
    assert set(local) <= {p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file()}
    assert json.loads((pushed / "model_index.json").read_text())["unet"] == ["if_diffusers_model", "IFUNet2DConditionModel"]  # fmt: skip
    assert {"if_diffusers_pipeline.py", "unet/if_diffusers_model.py"} <= set(local)
    loaded = DiffusionPipeline.from_pretrained("me/tiny-if-pushed", trust_remote_code=True, cache_dir=tmp_path / "c")
    assert type(loaded) is if_diffusers.IFImg2ImgPipeline and type(loaded.unet) is IFUNet2DConditionModel
    assert torch.equal(_run(loaded, "IFImg2ImgPipeline"), _run(pipeline, "IFImg2ImgPipeline"))


def test_diffusers_own_class_refuses_nothing_it_used_to_load(pipeline_components, local_hub, tmp_path):
    """diffusers' own `IFPipeline` still loads diffusers' DeepFloyd repos unchanged after `import if_diffusers`
    (the registration touches only the AutoPipeline tables)."""
    folder = _deepfloyd_folder(pipeline_components, "IFPipeline", tmp_path / "deepfloyd")
    local_hub.add_repo("deepfloyd/stock-if", folder)
    loaded = diffusers.IFPipeline.from_pretrained("deepfloyd/stock-if", cache_dir=tmp_path / "cache")
    assert type(loaded) is diffusers.IFPipeline and type(loaded.unet) is diffusers.UNet2DConditionModel


def test_folders_in_the_layout_before_component_files_still_load(pipeline_components, local_hub, tmp_path):
    """A folder saved before the component files (`"unet": ["if_diffusers.models.unet_if", ...]`, no
    `unet/if_diffusers_model.py`) loads with our class from the Hub and with both loaders from the folder."""
    folder = tmp_path / "before"
    pipeline = if_diffusers.IFPipeline(**pipeline_components("I"))
    pipeline.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = [IFUNet2DConditionModel.__module__, "IFUNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "if_diffusers_model.py").unlink()
    local_hub.add_repo("before/tiny-if", folder)
    expected = _run(pipeline, "IFPipeline")
    for loaded in (if_diffusers.IFPipeline.from_pretrained("before/tiny-if", cache_dir=tmp_path / "cache"),
                   if_diffusers.IFPipeline.from_pretrained(folder),
                   DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):  # fmt: skip
        assert type(loaded) is if_diffusers.IFPipeline and type(loaded.unet) is IFUNet2DConditionModel
        assert torch.equal(_run(loaded, "IFPipeline"), expected)
