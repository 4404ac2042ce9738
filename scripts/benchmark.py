"""Speed of stages I and II, four ways, on the same UNets, inputs and seed, in one run:

- "diffusers": diffusers' own IFPipeline / IFSuperResolutionPipeline, eager (the baseline);
- "diffusers compiled": the same with the compile a diffusers user applies by hand (diffusers' docs): the UNet in
  channels_last, `pipe.unet = torch.compile(pipe.unet, mode=..., fullgraph=True)`;
- "ours": this package's pipeline of the same name, eager;
- "ours enable_compile": the same after `pipe.enable_compile(mode=...)`;
- with `--regional`, "ours regional": after `pipe.enable_compile(mode=..., regional=True)`.

Per stage and in total: seconds per call and per image, ms per step, the cold start (first call less a warm one, for
compiled runs), peak memory above the resident weights (CUDA), achieved TFLOP/s (the UNet's FLOPs counted by `torch.utils.flop_counter`) and,
given `--peak-tflops`, the FLOP floor (the time the UNet's FLOPs take at that peak). Ratios are against "diffusers"
and "diffusers compiled" measured in this run; each variant has its own copy of the UNets, and the timed calls go
round the variants in turn. Ours keeps the original's float64 DDPM schedule (its images differ from diffusers' by
~1e-4, the last step's float32 rounding). The T5 encoder is outside what differs: every run gets the same
prompt embeddings. Cold starts are measured without inductor's on-disk caches (`TORCHINDUCTOR_FORCE_DISABLE_CACHES`).

    python scripts/benchmark.py --model demo                              # the bundled model, CPU
    python scripts/benchmark.py --model tiny --repeats 1 --backend eager  # a smoke run (no code generation)
    python scripts/benchmark.py --model published --device cuda --dtype bfloat16 --peak-tflops 989 \\
        --stage-1-timesteps smart100 --stage-2-timesteps smart50 --mode max-autotune-no-cudagraphs
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # cold starts from nothing; before torch loads

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import if_diffusers  # noqa: E402
from if_diffusers.demo_cascade import load_demo_cascade  # noqa: E402
from if_diffusers.models.original_params import OriginalUNetParams  # noqa: E402
from if_diffusers.pipelines.compilation import COMPILE_MODES  # noqa: E402
from if_diffusers.scheduling import denoising_scheduler, noising_scheduler  # noqa: E402
from if_diffusers.timesteps import resolve_timesteps  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VARIANTS = ("diffusers", "diffusers compiled", "ours", "ours enable_compile")
REGIONAL = "ours regional"  # with --regional: enable_compile(regional=True), for its cold start
# --model tiny: the tests' small IF UNets (original params), 16px stage I and a x4 stage II to 64px.
_TINY = {
    "image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
    "channel_mult": "1,2", "attention_resolutions": "8", "num_heads": 1, "num_head_channels": 16,
    "use_scale_shift_norm": True, "resblock_updown": True, "encoder_dim": 64, "encoder_channels": 64,
    "activation": "gelu", "att_pool_heads": 4,
}  # fmt: skip
TINY_PARAMS = {"I": _TINY, "II": {**_TINY, "in_channels": 6, "image_size": 64, "efficient_activation": True}}
PUBLISHED = {"I": "IF-I-XL", "II": "IF-II-L"}


@dataclass
class Stage:
    name: str  # "I" or "II"
    unet: torch.nn.Module
    inputs: dict  # the call's arguments but timesteps and generator
    timesteps: list[int]
    batch: int


def build_unets(model: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    if model == "demo":
        cascade = load_demo_cascade(torch_dtype=dtype)
        unets = {"I": cascade.stage_1_unet, "II": cascade.stage_2_unet}
    else:
        unets = {}
        for stage, cls in (
            ("I", if_diffusers.IFUNet2DConditionModel),
            ("II", if_diffusers.IFSuperResUNet2DConditionModel),
        ):
            torch.manual_seed(0)
            if model == "published":
                unets[stage] = cls.from_preset(PUBLISHED[stage], device=device, dtype=dtype)
            else:
                unets[stage] = cls.from_config(OriginalUNetParams.parse(TINY_PARAMS[stage]).to_unet_config())
    return {stage: unet.to(device=device, dtype=dtype).eval() for stage, unet in unets.items()}


def build_stages(unets: dict, args, device: torch.device, dtype: torch.dtype) -> list[Stage]:
    generator = torch.Generator(device).manual_seed(1)
    stages = []
    for stage, timesteps in (("I", args.stage_1_timesteps), ("II", args.stage_2_timesteps)):
        unet = unets[stage]
        width = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
        embeds = torch.randn(2, args.batch_size, 77, width, generator=generator, device=device, dtype=dtype)
        inputs = {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
        if stage == "II":
            size = unet.config.sample_size // 4
            inputs["image"] = torch.rand(args.batch_size, 3, size, size, generator=generator, device=device) * 2 - 1
        stages.append(Stage(stage, unet, inputs, resolve_timesteps(timesteps, 1000), args.batch_size))
    return stages


def pipeline_for(library, stage: Stage, unet: torch.nn.Module):
    name = "IFSuperResolutionPipeline" if stage.name == "II" else "IFPipeline"
    components = dict(tokenizer=None, text_encoder=None, unet=unet, scheduler=denoising_scheduler(stage.name),
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)  # fmt: skip
    if stage.name == "II":
        components["image_noising_scheduler"] = noising_scheduler()
    pipeline = getattr(library, name)(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def unet_flops(stage: Stage, device: torch.device) -> int:
    """FLOPs of one UNet call of the denoising loop (guidance: the batch doubled)."""
    unet, batch = stage.unet, 2 * stage.batch
    size = unet.config.sample_size
    text = torch.cat([stage.inputs["negative_prompt_embeds"], stage.inputs["prompt_embeds"]])
    sample = torch.zeros(batch, unet.config.in_channels, size, size, device=device, dtype=unet.dtype)
    labels = torch.full((batch,), 250, device=device) if stage.name == "II" else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(500, device=device), text, class_labels=labels)
    return counter.get_total_flops()


def timed_call(pipeline, stage: Stage, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipeline(**stage.inputs, timesteps=stage.timesteps, output_type="pt",
                      generator=torch.Generator(device).manual_seed(0)).images  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def variants(args) -> tuple[str, ...]:
    return (*VARIANTS, REGIONAL) if args.regional else VARIANTS


def variant_pipeline(variant: str, stage: Stage, args):
    """`variant`'s pipeline over its own copy of the stage's UNet (compiling changes a UNet in place)."""
    unet = copy.deepcopy(stage.unet)
    pipeline = pipeline_for(diffusers if variant.startswith("diffusers") else if_diffusers, stage, unet)
    options = dict(mode=args.mode, fullgraph=True, backend=args.backend)
    if variant == "diffusers compiled":
        unet.to(memory_format=torch.channels_last)
        pipeline.unet = torch.compile(unet, **options)
    elif variant in ("ours enable_compile", REGIONAL):
        pipeline.enable_compile(regional=variant == REGIONAL, **options)
    return pipeline


def measure_stage(stage: Stage, args, device: torch.device) -> dict[str, dict]:
    """Every variant's first call (the compiled ones compile in it), then `--repeats` rounds of one call per variant,
    interleaved so that drift in the machine's speed reaches every variant alike. Peak memory is the most a call
    allocated above what was allocated before it (CUDA)."""
    pipelines = {variant: variant_pipeline(variant, stage, args) for variant in variants(args)}
    results = {}
    for variant, pipeline in pipelines.items():
        images, first = timed_call(pipeline, stage, device)
        results[variant] = {"images": images.float().cpu(), "first": first, "times": [], "peak": None}
    for _ in range(args.repeats):
        for variant, pipeline in pipelines.items():
            if device.type == "cuda":
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            results[variant]["times"].append(timed_call(pipeline, stage, device)[1])
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated() - before) / 2**30
                results[variant]["peak"] = max(results[variant]["peak"] or 0.0, peak)
    for variant, result in results.items():
        result["seconds"] = statistics.median(result["times"])
        result["cold"] = result["first"] - result["seconds"] if variant not in ("diffusers", "ours") else None
    return results


def report(stages: list[Stage], results: dict, flops: dict, args, device: torch.device) -> None:
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.model} model, {args.dtype}, batch {args.batch_size}, guidance on, {where}; compile: "
          f"mode={args.mode} backend={args.backend}; median of {args.repeats} interleaved rounds after a first call")  # fmt: skip
    header = (f"{'stage':<7}{'variant':<22}{'s/call':>8}{'s/image':>9}{'ms/step':>9}{'cold s':>8}{'peak GiB':>9}"
              f"{'TFLOP/s':>9}{'vs diffusers':>13}{'vs d. compiled':>15}")  # fmt: skip
    print(header)
    totals = dict.fromkeys(variants(args), 0.0)
    for stage in stages:
        work = flops[stage.name] * len(stage.timesteps)
        for variant in variants(args):
            result = results[stage.name][variant]
            totals[variant] += result["seconds"]
            print(_row(stage.name, variant, result, len(stage.timesteps), stage.batch, work,
                       results[stage.name]["diffusers"]["seconds"], results[stage.name]["diffusers compiled"]["seconds"]))  # fmt: skip
        if args.peak_tflops:
            print(f"{'':<7}FLOP floor at {args.peak_tflops:g} TFLOP/s: {work / args.peak_tflops / 1e12:.3f} s/call "
                  f"({flops[stage.name] / 1e9:.1f} GFLOP per UNet call, {len(stage.timesteps)} steps)")  # fmt: skip
        difference = max((results[stage.name][v]["images"] - results[stage.name]["diffusers"]["images"]).abs().max().item()
                         for v in variants(args))  # fmt: skip
        print(f"{'':<7}max abs difference from diffusers' images: {difference:.2e}")
    print(f"{'total':<7}" + ", ".join(f"{v} {totals[v]:.3f} s" for v in totals))
    print(f"{'':<7}ours enable_compile: {totals['diffusers'] / totals['ours enable_compile']:.2f}x diffusers, "
          f"{totals['diffusers compiled'] / totals['ours enable_compile']:.2f}x diffusers compiled, "
          f"{totals['ours'] / totals['ours enable_compile']:.2f}x ours eager")  # fmt: skip


def _row(stage, variant, result, steps, batch, work, diffusers_seconds, compiled_seconds) -> str:
    seconds = result["seconds"]
    cold = "" if result["cold"] is None else f"{result['cold']:.1f}"
    peak = "" if result["peak"] is None else f"{result['peak']:.2f}"
    return (f"{stage:<7}{variant:<22}{seconds:>8.3f}{seconds / batch:>9.3f}{seconds / steps * 1e3:>9.1f}{cold:>8}"
            f"{peak:>9}{work / seconds / 1e12:>9.3f}{diffusers_seconds / seconds:>12.2f}x"
            f"{compiled_seconds / seconds:>14.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("demo", "tiny", "published"), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--stage-1-timesteps", default="smart50")
    parser.add_argument("--stage-2-timesteps", default="smart27")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--mode", choices=COMPILE_MODES, default="default")
    parser.add_argument("--regional", action="store_true", help=f"add {REGIONAL!r}: enable_compile(regional=True)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense TFLOP/s at --dtype, for the FLOP floor (H100 SXM bf16: 989)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("repeats", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: expected a positive integer")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    dtype = DTYPES[args.dtype]
    stages = build_stages(build_unets(args.model, device, dtype), args, device, dtype)
    flops = {stage.name: unet_flops(stage, device) for stage in stages}
    results = {stage.name: measure_stage(stage, args, device) for stage in stages}
    report(stages, results, flops, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
