"""Tiny offline components: random-weight original IF UNets saved in DeepFloyd's layout, converted folders, a
small T5 encoder and a T5 tokenizer trained on the spot. Everything is seeded; nothing touches the network."""

from __future__ import annotations

# ruff: noqa: E402
# The Hub on localhost first (tests/local_hub.py): huggingface_hub reads HF_ENDPOINT and HF_HOME once, on import, and
# the imports below reach it (if_diffusers imports diffusers).
from local_hub import LocalHub, start_session_hub

SESSION_HUB = start_session_hub()

import os

# Under pytest-xdist (README's `-n 2`) each worker has one core: the processes the tests start (the command line, the
# batch runner, torchrun) take one thread too, as the workers' torch does (`_one_thread`), instead of contending.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from if_diffusers.conversion.oracle import build_original_unet, randomize_

ORIGINAL_BASE = {
    "image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
    "channel_mult": "1,2", "attention_resolutions": "8", "num_heads": 1, "num_head_channels": 16,
    "use_scale_shift_norm": True, "resblock_updown": True, "encoder_dim": 24, "encoder_channels": 64,
    "activation": "gelu", "att_pool_heads": 4, "disable_self_attentions": False, "precision": "32",
}  # fmt: skip

# Small configs that vary what the conversion must get right (names say what each one stresses).
STAGE_I_CONFIGS = {
    "base": ORIGINAL_BASE,
    "res_block_list_cross_only": {**ORIGINAL_BASE, "channel_mult": "1,2,2", "num_res_blocks": [1, 2, 1],
                                  "attention_resolutions": "8,4", "disable_self_attentions": "8"},
    "efficient_scaled_no_proj": {**ORIGINAL_BASE, "channel_mult": [1, 2, 3], "num_res_blocks": 2,
                                 "attention_resolutions": [2, 4], "efficient_activation": True,
                                 "scale_skip_connection": True, "encoder_dim": 96, "encoder_channels": 96,
                                 "use_scale_shift_norm": False, "att_pool_heads": 8, "activation": "silu"},
    "fixed_heads_all_cross_only": {**ORIGINAL_BASE, "channel_mult": "1,2,2", "attention_resolutions": [2, 4],
                                   "disable_self_attentions": True, "num_head_channels": -1, "num_heads": 2,
                                   "att_pool_heads": 2},
    # The original resolves `disable_self_attentions: true` to the raw resolution string, which disables nothing.
    "true_with_string_resolutions": {**ORIGINAL_BASE, "disable_self_attentions": True},
    "wide_four_levels": {**ORIGINAL_BASE, "image_size": 32, "channel_mult": "1,2,3,4", "num_res_blocks": 2,
                         "attention_resolutions": "16,8,4", "num_head_channels": 32, "encoder_channels": 128},
}  # fmt: skip
STAGE_II_CONFIGS = {
    "super_res": {**ORIGINAL_BASE, "in_channels": 6, "image_size": 32, "channel_mult": "1,2,4",
                  "num_res_blocks": [1, 1, 2], "attention_resolutions": "8", "efficient_activation": True,
                  "scale_skip_connection": True},
    "super_res_plain": {**ORIGINAL_BASE, "in_channels": 6, "num_heads": 2, "num_head_channels": -1,
                        "disable_self_attentions": "8"},
}  # fmt: skip
ALL_CONFIGS = {**STAGE_I_CONFIGS, **STAGE_II_CONFIGS}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run on one intra-op thread: on a loaded 2-core machine two threads contend and run ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _dynamic_modules_in_tmp(tmp_path_factory, monkeypatch):
    """diffusers copies a folder's custom pipeline file (`if_diffusers_pipeline.py`) into `HF_MODULES_CACHE` (by
    default ~/.cache/huggingface/modules) and appends that folder to `sys.path`: keep both inside the test run."""
    import sys

    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
    monkeypatch.setattr(sys, "path", list(sys.path))


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` of the repository, imported as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def original_unet(params: dict, seed: int = 0):
    """A random-weight `deepfloyd_if` UNetModel (stage I) or SuperResUNetModel (6 input channels)."""
    torch.manual_seed(seed)
    return randomize_(build_original_unet(params), seed)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """`converted(name)` -> (original model, converted folder) for a config of ALL_CONFIGS, built once."""
    from if_diffusers.conversion import convert_original_checkpoint, write_checkpoint

    cache: dict[str, tuple] = {}

    def build(name: str):
        if name not in cache:
            params = ALL_CONFIGS[name]
            model = original_unet(params, seed=len(cache))
            root = tmp_path_factory.mktemp(name)
            write_checkpoint(root / "original", params, model.state_dict())
            cache[name] = (model, convert_original_checkpoint(root / "original", root / "diffusers"))
        return cache[name]

    return build


@pytest.fixture(scope="session")
def tiny_t5_folder(tmp_path_factory) -> Path:
    """A 2-layer T5 encoder of width 24 (ORIGINAL_BASE's encoder_dim), saved with save_pretrained."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("t5") / "text_encoder"
    T5EncoderModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_folder(tmp_path_factory) -> Path:
    """A T5 tokenizer whose sentencepiece unigram vocabulary is trained here on a few captions."""
    import sentencepiece as spm

    from if_diffusers.installed_versions import t5_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    captions = ["a red circle on a blue background", "a small green square at the top left",
                "a large yellow triangle in the middle", "the words hello world written on a sign"]  # fmt: skip
    (root / "captions.txt").write_text("\n".join(captions * 10))
    spm.SentencePieceTrainer.train(input=str(root / "captions.txt"), model_prefix=str(root / "spiece"),
                                   vocab_size=40, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)  # fmt: skip
    pieces = spm.SentencePieceProcessor(model_file=str(root / "spiece.model"))
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    t5_tokenizer(vocab, extra_ids=0).save_pretrained(root / "tokenizer")  # the same on transformers 4 and 5
    return root / "tokenizer"


@pytest.fixture(scope="session")
def tiny_text(tiny_t5_folder, tiny_tokenizer_folder):
    """(tokenizer, text_encoder) objects of the tiny T5."""
    from transformers import T5EncoderModel

    from if_diffusers.installed_versions import t5_tokenizer_class

    tokenizer = t5_tokenizer_class(tiny_tokenizer_folder).from_pretrained(tiny_tokenizer_folder)
    return tokenizer, T5EncoderModel.from_pretrained(tiny_t5_folder).eval()


def tiny_unet(stage: str, seed: int = 0):
    """A tiny random IF UNet of our classes: stage "I" (16px) or "II" (32px, 4x of 8px)."""
    from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
    from if_diffusers.models.original_params import OriginalUNetParams

    params = ORIGINAL_BASE if stage == "I" else STAGE_II_CONFIGS["super_res"]
    cls = IFUNet2DConditionModel if stage == "I" else IFSuperResUNet2DConditionModel
    torch.manual_seed(seed)
    return randomize_(cls.from_config(OriginalUNetParams.parse(params).to_unet_config()), seed)


@pytest.fixture(scope="session")
def pipeline_components(tiny_text):
    """`pipeline_components(stage)` -> the components dict of a stage's pipeline (no safety checker)."""
    from if_diffusers.scheduling import denoising_scheduler, noising_scheduler

    tokenizer, text_encoder = tiny_text
    unets = {"I": tiny_unet("I"), "II": tiny_unet("II")}

    def build(stage: str) -> dict:
        components = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unets[stage],
                          scheduler=denoising_scheduler(stage), safety_checker=None, feature_extractor=None,
                          watermarker=None, requires_safety_checker=False)  # fmt: skip
        if stage == "II":
            components["image_noising_scheduler"] = noising_scheduler()
        return components

    return build


@pytest.fixture(scope="session")
def tiny_upscaler():
    """Components of a tiny Stable Diffusion x4 upscaler (stage III): a UNet with 7 input channels (4 latent + 3
    low-res) and noise-level class labels, a VAE decoding x4, a CLIP text encoder of width 32 and a character-level
    CLIP tokenizer. Returned as the keyword arguments of `StableDiffusionUpscalePipeline` (no safety components)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from if_diffusers.installed_versions import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, num_class_embeds=351,
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        scaling_factor=0.08333,
    ).eval()  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=60, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()  # fmt: skip
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{f"{c}</w>": 28 + i for i, c in enumerate(letters)}}  # fmt: skip
    tokenizer = clip_tokenizer(vocab, merges=[], model_max_length=77)
    # The repo's own settings: DDIM for sampling (the cascade swaps in DDPM as the original), DDPM for augmentation.
    beta = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                low_res_scheduler=DDPMScheduler(**beta), scheduler=DDIMScheduler(**beta, clip_sample=False,
                                                                                  set_alpha_to_one=False,
                                                                                  prediction_type="v_prediction"))  # fmt: skip


@pytest.fixture(scope="session")
def cascade_folder(pipeline_components, tiny_upscaler, tmp_path_factory) -> Path:
    """A saved IFCascadePipeline of the tiny stages I (16px), II (x4) and III (the tiny x4 upscaler): 256px images."""
    from diffusers import StableDiffusionUpscalePipeline

    from if_diffusers import IFCascadePipeline, IFPipeline, IFSuperResolutionPipeline

    folder = tmp_path_factory.mktemp("cascade") / "cascade"
    stages = (IFPipeline(**pipeline_components("I")), IFSuperResolutionPipeline(**pipeline_components("II")),
              StableDiffusionUpscalePipeline(**tiny_upscaler))  # fmt: skip
    IFCascadePipeline.from_stages(*stages).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def local_hub() -> LocalHub:
    """The session's Hub on localhost, which HF_ENDPOINT points at for this process and the subprocesses it starts.
    Shared by every test, as is the cache under HF_HOME: give each repo an id of its own, and `clear_log()` first."""
    return SESSION_HUB


@pytest.fixture(scope="session")
def demo_app(tmp_path_factory):
    """The app (`if_diffusers.app`) over the bundled demo cascade, served on a free localhost port for the session:
    `.url`, `.jobs`, `.pipeline`. Its queue takes 4 waiting requests, one job at a time."""
    import socket
    from types import SimpleNamespace

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(tmp_path_factory.mktemp("gradio_examples"))
    from if_diffusers import demo_cascade
    from if_diffusers.app import CascadeJobs, build_app
    from if_diffusers.generation_record import BUNDLED_MODEL

    pipeline = demo_cascade.load_demo_cascade()
    jobs = CascadeJobs(pipeline, {"model": BUNDLED_MODEL, "stage_2": None, "stage_3": None}, torch.device("cpu"))
    app = build_app(jobs, queue_size=4, concurrency=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", jobs=jobs, pipeline=pipeline, app=app)
    app.close()
