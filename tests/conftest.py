"""Tiny offline components: random-weight original IF UNets saved in DeepFloyd's layout, converted folders, a
small T5 encoder and a T5 tokenizer trained on the spot. Everything is seeded; nothing touches the network."""

from __future__ import annotations

from pathlib import Path

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
    from transformers import T5Tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    captions = ["a red circle on a blue background", "a small green square at the top left",
                "a large yellow triangle in the middle", "the words hello world written on a sign"]  # fmt: skip
    (root / "captions.txt").write_text("\n".join(captions * 10))
    spm.SentencePieceTrainer.train(input=str(root / "captions.txt"), model_prefix=str(root / "spiece"),
                                   vocab_size=40, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)  # fmt: skip
    pieces = spm.SentencePieceProcessor(model_file=str(root / "spiece.model"))
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(root / "tokenizer")
    return root / "tokenizer"


@pytest.fixture(scope="session")
def tiny_text(tiny_t5_folder, tiny_tokenizer_folder):
    """(tokenizer, text_encoder) objects of the tiny T5."""
    from transformers import T5EncoderModel, T5Tokenizer

    return T5Tokenizer.from_pretrained(tiny_tokenizer_folder), T5EncoderModel.from_pretrained(tiny_t5_folder).eval()


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
