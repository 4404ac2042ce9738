"""IFCascadePipeline on CUDA: offload modes, and speed against diffusers' documented three-pipeline cascade.

1. Offload: a cascade of small random components (the IF-I-XL / IF-II-L / SD x4 structures at a small width) runs
   plainly on the GPU, then with `enable_model_cpu_offload`, `enable_sequential_cpu_offload` and
   `enable_group_offload`; each must give the plain images, and under model offload only the model that runs may be
   on the GPU. Prints max abs difference, peak memory and time per mode.
2. Speed: the published architectures at full size with random weights (IF-I-XL, IF-II-L, the SD x4 upscaler's UNet,
   VAE and an OpenCLIP-H-sized text encoder; T5-XXL cut to `--t5-layers` layers, noted in the output), bf16 (random
   weights overflow in fp16). Our
   cascade (one call, smart100 / smart50 / 75 steps) against the baseline: diffusers' IFPipeline ->
   IFSuperResolutionPipeline -> StableDiffusionUpscalePipeline chained as diffusers' IF docs do (100 / 50 / 75
   steps, the same step counts), on the same model objects, all on the GPU and with model offload on each.
   Prints seconds, peak GiB and the ratio baseline / ours (> 1: ours faster).

    python scripts/benchmark_cascade_gpu.py [--skip-offload] [--skip-speed] [--t5-layers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_offload_gpu import MODES, PROMPTS, TOLERANCE, run_in_mode, tiny_components  # noqa: E402

SD_X4_UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=8, use_linear_projection=True,
    only_cross_attention=(True, True, True, False), num_class_embeds=1000,
)  # fmt: skip  # stabilityai/stable-diffusion-x4-upscaler unet/config.json
SD_X4_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512),
                 layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333)  # fmt: skip
OPEN_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)  # fmt: skip


def clip_tokenizer():
    """A character-level CLIP tokenizer (offline); the benchmark only needs token ids of the right kind."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{f"{c}</w>": 28 + i for i, c in enumerate(letters)}}  # fmt: skip
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def upscaler_components(unet: dict, vae: dict, clip: dict, device: str, dtype: torch.dtype) -> dict:
    """StableDiffusionUpscalePipeline's components with random weights (DDPM sampling, as the original IF runs it)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    beta = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    return dict(
        unet=_random(UNet2DConditionModel, unet, device, dtype), vae=_random(AutoencoderKL, vae, device, dtype),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip)).to(device, dtype).eval(), tokenizer=clip_tokenizer(),
        scheduler=DDPMScheduler(**beta, prediction_type="v_prediction"), low_res_scheduler=DDPMScheduler(**beta),
    )  # fmt: skip


def _random(cls, config, device: str, dtype: torch.dtype):
    """`cls` from `config` (a dict, or a transformers config) with its library's default initialisation, built
    directly on `device` (seconds for billions of parameters on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config) if isinstance(config, dict) else cls(config)
    return model.to(dtype).eval()


# --- 1. offload ----------------------------------------------------------------------------------------------------


def check_offload(folder: Path) -> bool:
    from diffusers import StableDiffusionUpscalePipeline

    from if_diffusers import IFCascadePipeline, IFPipeline, IFSuperResolutionPipeline

    small_unet = {**SD_X4_UNET, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 64}
    small_clip = {**OPEN_CLIP_H, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4}  # fmt: skip
    small_vae = {**SD_X4_VAE, "block_out_channels": (32, 32, 64)}
    stages = (IFPipeline(**tiny_components("I", 64, folder)), IFSuperResolutionPipeline(**tiny_components("II", 64, folder)),
              StableDiffusionUpscalePipeline(**upscaler_components(small_unet, small_vae, small_clip, "cpu", torch.float32)))  # fmt: skip
    base = IFCascadePipeline.from_stages(*stages)
    ok, plain = True, None
    for mode, enable in MODES.items():
        pipeline = IFCascadePipeline(**{k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v
                                        for k, v in base.components.items()}, requires_safety_checker=False)  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        on_gpu_while_running = _watch_gpu_residents(pipeline) if mode == "model_cpu_offload" else None
        run = run_in_mode("cascade", mode, enable, pipeline, lambda p: p(
            PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="pt", stage_1_num_inference_steps=4,
            stage_2_num_inference_steps=4, stage_3_num_inference_steps=4).images)  # fmt: skip
        if run is None:
            ok = False
            continue
        images, seconds, peak = run
        plain = images if plain is None else plain
        difference = (images - plain).abs().max().item()
        good = difference <= TOLERANCE
        note = ""
        if on_gpu_while_running is not None:
            crowded = {running: others for running, others in on_gpu_while_running.items() if others - {running}}
            good &= not crowded and len(on_gpu_while_running) == 6
            note = f"  models seen running: {len(on_gpu_while_running)}, others on GPU meanwhile: {crowded or 'none'}"
        ok &= good
        print(f"cascade {mode:26s} max|diff| {difference:.2e}  peak {peak:8.1f} MiB  {seconds:6.2f} s{note}"
              f"{'' if good else '  <-- FAILED'}")  # fmt: skip
    return ok


def _watch_gpu_residents(pipeline) -> dict[str, set[str]]:
    """After each forward of a model: which of the pipeline's models have weights on the GPU."""
    models = {n: m for n, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}
    seen: dict[str, set[str]] = {}

    def on_gpu() -> set[str]:
        return {n for n, m in models.items() if any(p.is_cuda for p in m.parameters())}

    for name, model in models.items():
        target = model.decoder if name == "stage_3_vae" else model  # the VAE runs through vae.decode
        target.register_forward_hook(lambda *args, name=name: seen.setdefault(name, set()).update(on_gpu()))
    return seen


# --- 2. speed ------------------------------------------------------------------------------------------------------


def full_size_cascade(t5_layers: int, folder: Path, device: str = "cuda"):
    """Our cascade and diffusers' three pipelines over the same full-size fp16 models on the GPU."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    from if_diffusers import IFCascadePipeline, IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
    from if_diffusers.scheduling import denoising_scheduler, noising_scheduler

    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # fp16 random weights overflow to NaN
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    text = dict(tokenizer=tiny_components_tokenizer(folder), text_encoder=_random(T5EncoderModel, t5, device, dtype))
    unet_1 = IFUNet2DConditionModel.from_preset("IF-I-XL", device=device, dtype=dtype).eval()
    unet_2 = IFSuperResUNet2DConditionModel.from_preset("IF-II-L", device=device, dtype=dtype).eval()
    stage_3 = upscaler_components(SD_X4_UNET, SD_X4_VAE, OPEN_CLIP_H, device, dtype)
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    ours = IFCascadePipeline(**text, stage_1_unet=unet_1, stage_1_scheduler=denoising_scheduler("I"),
                             stage_2_unet=unet_2, stage_2_scheduler=denoising_scheduler("II"),
                             stage_2_image_noising_scheduler=noising_scheduler(),
                             **{f"stage_3_{k}": v for k, v in stage_3.items()}, **none)  # fmt: skip
    theirs = (
        diffusers.IFPipeline(**text, unet=unet_1, scheduler=denoising_scheduler("I"), **none),
        diffusers.IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=unet_2,
                                            scheduler=denoising_scheduler("II"),
                                            image_noising_scheduler=noising_scheduler(), **none),
        diffusers.StableDiffusionUpscalePipeline(**stage_3),
    )  # fmt: skip
    for pipeline in (ours, *theirs):
        pipeline.set_progress_bar_config(disable=True)
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in
              (("IF-I-XL", unet_1), ("IF-II-L", unet_2), ("SD x4 UNet", stage_3["unet"]), ("x4 VAE", stage_3["vae"]),
               ("CLIP text", stage_3["text_encoder"]), (f"T5 ({t5_layers} layers)", text["text_encoder"]))}  # fmt: skip
    print("parameters (M): " + ", ".join(f"{k} {v:,.1f}" for k, v in counts.items()))
    return ours, theirs


def tiny_components_tokenizer(folder: Path):
    from check_offload_gpu import _tokenizer

    return _tokenizer(folder)


def run_ours(ours) -> torch.Tensor:
    images = ours(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(images).all(), "the random-weight cascade gave non-finite images"
    return images


def run_theirs(theirs) -> torch.Tensor:
    """diffusers' IF docs' cascade: encode once, stage I and II as "pt", stage III from the text prompt."""
    stage_1, stage_2, stage_3 = theirs
    generator = torch.Generator().manual_seed(0)
    embeds, negative = stage_1.encode_prompt(PROMPTS[0])
    images = stage_1(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator,
                     output_type="pt").images  # fmt: skip
    images = stage_2(image=images, prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator,
                     output_type="pt").images  # fmt: skip
    return stage_3(prompt=PROMPTS[0], image=(images + 1) / 2, noise_level=20, generator=generator,
                   output_type="pt").images  # fmt: skip


def timed(function, pipelines, prepare, repeats: int) -> tuple[float, float]:
    """`prepare` each pipeline, then median seconds of `function(pipelines)` over `repeats` runs after one warm-up,
    and the peak GiB; the offload hooks are removed afterwards (the two sides share the models)."""
    for pipeline in pipelines:
        prepare(pipeline)
    function(pipelines)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(pipelines)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    for pipeline in pipelines:
        pipeline.remove_all_hooks()
    return sorted(seconds)[len(seconds) // 2], torch.cuda.max_memory_allocated() / 2**30


def benchmark_speed(t5_layers: int, repeats: int, folder: Path) -> None:
    ours, theirs = full_size_cascade(t5_layers, folder)
    print(f"full cascade, 1 image 1024x1024, bf16, T5 cut to {t5_layers} layers (T5-XXL has 24)")
    for label, prepare in (("all on GPU", lambda p: p.to("cuda")),
                           ("model offload", lambda p: p.enable_model_cpu_offload())):  # fmt: skip
        theirs_s, theirs_gib = timed(run_theirs, theirs, prepare, repeats)
        ours_s, ours_gib = timed(lambda pipelines: run_ours(pipelines[0]), [ours], prepare, repeats)
        print(f"{label:14s} ours {ours_s:6.2f} s peak {ours_gib:5.2f} GiB | diffusers' 3 pipelines {theirs_s:6.2f} s "
              f"peak {theirs_gib:5.2f} GiB | ratio diffusers/ours {theirs_s / ours_s:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-offload", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: this check needs a GPU; nothing was run.")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_offload:
            ok = check_offload(Path(folder))
            print("offload: all modes match the plain run" if ok else "offload: FAILED, see above")
        if not args.skip_speed:
            benchmark_speed(args.t5_layers, args.repeats, Path(folder))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
