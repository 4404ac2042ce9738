"""Check the offload modes of the six IF pipelines on CUDA: each runs with small random components (the published
IF-I-XL / IF-II-L structure at a small width, a small T5, a tokenizer trained on the spot) plainly on the GPU, then
with `enable_model_cpu_offload`, `enable_sequential_cpu_offload` and `enable_group_offload` (block level; leaf level
with a CUDA stream). Prints, per pipeline and mode, the max abs difference to the plain images, the peak GPU memory
and the time, and exits 1 if a mode fails or differs by more than the tolerance. Without CUDA it says so and exits 0.

    python scripts/check_offload_gpu.py [--steps 4] [--model-channels 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

TOLERANCE = 1e-4  # max abs, float32: offloading moves weights, it must not change the arithmetic
PROMPTS = ["a red circle on a blue background", "a small green square at the top left",
           "a large yellow triangle in the middle", "the words hello world written on a sign"]  # fmt: skip
ENCODER_DIM = 64


def _tokenizer(folder: Path):
    """A T5 tokenizer with a sentencepiece unigram vocabulary trained on a few captions (offline)."""
    import sentencepiece as spm

    from if_diffusers.installed_versions import t5_tokenizer

    (folder / "captions.txt").write_text("\n".join(PROMPTS * 10))
    spm.SentencePieceTrainer.train(input=str(folder / "captions.txt"), model_prefix=str(folder / "spiece"),
                                   vocab_size=40, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                                   minloglevel=2)  # fmt: skip
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    return t5_tokenizer(vocab, extra_ids=0)


def _unet(stage: str, model_channels: int):
    """The published structure of IF-I-XL (stage I) or IF-II-L (stage II) at `model_channels`, random weights."""
    from if_diffusers import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
    from if_diffusers.conversion.oracle import randomize_
    from if_diffusers.models import PRESETS
    from if_diffusers.models.original_params import OriginalUNetParams

    preset = PRESETS["IF-I-XL" if stage == "I" else "IF-II-L"].params
    widest = max(int(m) for m in str(preset["channel_mult"]).split(","))
    params = {**preset, "model_channels": model_channels, "encoder_channels": model_channels * widest,
              "encoder_dim": ENCODER_DIM, "num_head_channels": 32, "att_pool_heads": 8, "precision": "32"}  # fmt: skip
    cls = IFUNet2DConditionModel if stage == "I" else IFSuperResUNet2DConditionModel
    torch.manual_seed(0)
    return randomize_(cls.from_config(OriginalUNetParams.parse(params).to_unet_config()), seed=0)


def tiny_components(stage: str, model_channels: int, folder: Path) -> dict:
    """The components of a stage's pipeline, on the CPU, without safety checker and watermarker."""
    from transformers import T5Config, T5EncoderModel

    from if_diffusers.scheduling import denoising_scheduler, noising_scheduler

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=ENCODER_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    components = dict(tokenizer=_tokenizer(folder), text_encoder=T5EncoderModel(config).eval(),
                      unet=_unet(stage, model_channels), scheduler=denoising_scheduler(stage), safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)  # fmt: skip
    if stage == "II":
        components["image_noising_scheduler"] = noising_scheduler()
    return components


def _inputs(name: str, size: int) -> dict:
    """The image arguments of each pipeline (stage II: `size` x `size` low-res input, 4x output)."""
    generator = torch.Generator().manual_seed(1)

    def image(side: int) -> torch.Tensor:
        return torch.rand(1, 3, side, side, generator=generator) * 2 - 1

    mask = (torch.rand(1, 1, 4 * size, 4 * size, generator=generator) > 0.5).float()
    return {
        "IFPipeline": {},
        "IFImg2ImgPipeline": dict(image=image(size), strength=0.75),
        "IFInpaintingPipeline": dict(image=image(size), mask_image=mask[..., ::4, ::4], strength=0.75),
        "IFSuperResolutionPipeline": dict(image=image(size)),
        "IFImg2ImgSuperResolutionPipeline": dict(image=image(size), original_image=image(4 * size), strength=0.75),
        "IFInpaintingSuperResolutionPipeline": dict(image=image(size), original_image=image(4 * size),
                                                    mask_image=mask, strength=0.75),
    }[name]  # fmt: skip


MODES: dict[str, Callable] = {
    "plain": lambda pipe: pipe.to("cuda"),
    "model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(),
    "sequential_cpu_offload": lambda pipe: pipe.enable_sequential_cpu_offload(),
    "group_offload_block": lambda pipe: pipe.enable_group_offload(
        onload_device=torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1
    ),
    "group_offload_leaf_stream": lambda pipe: pipe.enable_group_offload(
        onload_device=torch.device("cuda"), offload_type="leaf_level", use_stream=True
    ),
}


def run_in_mode(label: str, mode: str, enable: Callable, pipeline, call: Callable) -> tuple | None:
    """Enable `mode` on `pipeline`, then time `call(pipeline)` (it returns images): `(images on the CPU, seconds,
    peak MiB)`, or `None` after printing the failure (every mode is reported before the check fails)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        enable(pipeline)
        start = time.perf_counter()
        images = call(pipeline).cpu()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    except Exception as error:
        print(f"{label} {mode:26s} FAILED: {type(error).__name__}: {error}")
        return None
    return images, seconds, torch.cuda.max_memory_allocated() / 2**20


def check(name: str, components: dict, steps: int, size: int) -> bool:
    """Run `name` in every mode; print one line per mode; True when all ran and matched the plain images."""
    import if_diffusers

    ok, plain = True, None
    for mode, enable in MODES.items():
        pipeline = getattr(if_diffusers, name)(**dict(components, unet=copy.deepcopy(components["unet"]),
                                                      text_encoder=copy.deepcopy(components["text_encoder"])))  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        run = run_in_mode(f"{name:38s}", mode, enable, pipeline, lambda p: p(
            prompt=PROMPTS[0], **_inputs(name, size), num_inference_steps=steps, output_type="pt",
            generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
        if run is None:
            ok = False
            continue
        images, seconds, peak = run
        plain = images if plain is None else plain
        difference = (images - plain).abs().max().item()
        where = pipeline.unet.device.type if mode == "model_cpu_offload" else "-"
        good = difference <= TOLERANCE and where in ("cpu", "-")
        ok &= good
        print(f"{name:38s} {mode:26s} max|diff| {difference:.2e}  peak {peak:8.1f} MiB  {seconds:6.2f} s"
              f"{'  unet after call: ' + where if where != '-' else ''}{'' if good else '  <-- MISMATCH'}")  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model-channels", type=int, default=64, help="UNet width (IF-I-XL: 704, IF-II-L: 160)")
    parser.add_argument("--size", type=int, default=64, help="stage-I output and stage-II input size")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: the offload check needs a GPU; nothing was run.")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        for stage, names in (("I", ["IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"]),
                             ("II", ["IFSuperResolutionPipeline", "IFImg2ImgSuperResolutionPipeline",
                                     "IFInpaintingSuperResolutionPipeline"])):  # fmt: skip
            components = tiny_components(stage, args.model_channels, Path(folder))
            for name in names:
                ok &= check(name, components, args.steps, args.size)
    print("all modes match the plain run" if ok else "FAILED: see the lines above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
