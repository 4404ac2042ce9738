"""Time our stage pipelines against diffusers' own IF pipelines on the same UNet, inputs and seed.

Builds a published IF size with random weights (`--preset`, e.g. IF-I-XL or IF-II-L), feeds both pipelines the same
random T5 embeddings (the T5 encoder is outside what differs between them), and prints, per pipeline: median wall
time of a whole generation, time per step, peak accelerator memory, and the max abs difference of the images.
The baseline is diffusers' pipeline of the same name, measured in the same run.

    python scripts/benchmark_stage_pipelines.py --preset IF-I-XL --device cuda --dtype float16
    python scripts/benchmark_stage_pipelines.py --preset IF-II-L --device cuda --dtype float16 --timesteps smart50
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch

import if_diffusers
from if_diffusers.models.presets import PRESETS
from if_diffusers.scheduling import denoising_scheduler, noising_scheduler
from if_diffusers.timesteps import resolve_timesteps

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_pipelines(preset: str, device: torch.device, dtype: torch.dtype):
    """(ours, diffusers') pipelines of the preset's stage sharing one UNet; no text encoder."""
    stage = "II" if PRESETS[preset].params["in_channels"] == 6 else "I"
    unet_class = if_diffusers.IFSuperResUNet2DConditionModel if stage == "II" else if_diffusers.IFUNet2DConditionModel
    torch.manual_seed(0)
    unet = unet_class.from_preset(preset, device=device, dtype=dtype).eval()
    name = "IFSuperResolutionPipeline" if stage == "II" else "IFPipeline"
    components = dict(tokenizer=None, text_encoder=None, unet=unet, scheduler=denoising_scheduler(stage),
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)  # fmt: skip
    if stage == "II":
        components["image_noising_scheduler"] = noising_scheduler()
    pipelines = []
    for module in (if_diffusers, diffusers):
        pipeline = getattr(module, name)(**components)
        pipeline.set_progress_bar_config(disable=True)
        pipelines.append(pipeline)
    return stage, pipelines


def run_once(pipeline, inputs: dict, timesteps: list[int], device: torch.device) -> tuple[torch.Tensor, float]:
    """One generation; returns the images `(B, 3, H, W)` and its wall time in seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    # diffusers' pipelines take only lists for timesteps: give both the same explicit steps.
    images = pipeline(
        **inputs, timesteps=timesteps, output_type="pt", generator=torch.Generator(device).manual_seed(0)
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images.images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="IF-I-XL", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--timesteps", default="smart27", help="respacing preset for both pipelines")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--float32-schedule", action="store_true",
                        help="run ours with diffusers' float32 DDPM schedule (float64_schedule=False) for parity")  # fmt: skip
    args = parser.parse_args()
    if args.repeats < 1 or args.batch_size < 1:
        parser.error(f"--repeats={args.repeats} and --batch-size={args.batch_size} must be positive")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    stage, (ours, theirs) = build_pipelines(args.preset, device, dtype)
    steps = resolve_timesteps(args.timesteps, 1000)
    generator = torch.Generator(device).manual_seed(1)
    width = ours.unet.config.encoder_hid_dim
    embeds = torch.randn(2, args.batch_size, 77, width, generator=generator, device=device, dtype=dtype)
    inputs = {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
    if stage == "II":
        size = ours.unet.config.sample_size // 4
        inputs["image"] = torch.rand(args.batch_size, 3, size, size, generator=generator, device=device) * 2 - 1
        inputs["noise_level"] = 250

    results = {}
    for label, pipeline in (("diffusers", theirs), ("if_diffusers", ours)):
        pipeline_inputs = (
            dict(inputs, float64_schedule=False) if label == "if_diffusers" and args.float32_schedule else inputs
        )
        run_once(pipeline, pipeline_inputs, steps, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            images, seconds = run_once(pipeline, pipeline_inputs, steps, device)
            times.append(seconds)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[label] = (images.float(), statistics.median(times), peak)

    difference = (results["if_diffusers"][0] - results["diffusers"][0]).abs().max().item()
    base_time = results["diffusers"][1]
    print(f"{args.preset} {args.dtype} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"batch {args.batch_size}, {len(steps)} steps ({args.timesteps}), median of {args.repeats}, "
          f"our DDPM schedule in {'float32' if args.float32_schedule else 'float64'}")  # fmt: skip
    print(f"{'pipeline':<14}{'s/image set':>12}{'ms/step':>10}{'peak GiB':>10}{'speed vs diffusers':>20}")
    for label, (_, seconds, peak) in results.items():
        print(
            f"{label:<14}{seconds:>12.3f}{seconds / len(steps) * 1e3:>10.1f}{peak:>10.2f}{base_time / seconds:>19.3f}x"
        )
    print(f"max abs difference of the images: {difference:.3e}")


if __name__ == "__main__":
    main()
