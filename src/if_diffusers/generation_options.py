"""What `if-diffusers generate` and `if-diffusers batch` share: their model and sampling options, the checks made on
them before any model loads (device, output file, numbers), loading the cascade, the cascade keyword arguments the
options become, and the seeds of the images.

Seeds: image k of a prompt with seed S is drawn with its own generator seeded S + k (diffusers' one generator per
image), so an image is the same whichever batch it is made in: `generate --seed S --num-images 4`'s third image is
`generate --seed S+2`'s image, and a `batch` line with seed S makes `generate --seed S`'s images.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from . import demo_cascade
from .generation_record import BUNDLED_MODEL
from .installed_versions import dtype_argument
from .quantization import TEXT_ENCODER_QUANTIZATIONS, text_encoder_quantization
from .synthetic import shapes

if TYPE_CHECKING:
    from .pipelines import IFCascadePipeline

MODES = ("text2img", "img2img", "inpaint")
OFFLOAD = ("none", "model", "sequential")
DTYPES = ("float32", "float16", "bfloat16")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; JSON and int64 columns up to this
MAX_NAMED_WORDS = 10  # of a prompt file's words unknown to the bundled model, the warning names the first ones


def add_model_arguments(parser: argparse.ArgumentParser, offload_default: str = "none") -> None:
    """--model, --stage-2, --stage-3, --device, --dtype, --offload (`offload_default` "auto" adds that choice),
    --quantize-text-encoder."""
    parser.add_argument("--model", help="a saved IFCascadePipeline folder, or stage I's folder or hub id (with "
                        "--stage-2); default: the demo cascade bundled in the package (32x32 -> 128x128 shapes)")  # fmt: skip
    parser.add_argument("--stage-2", help="stage II's folder or hub id, when --model is stage I's")
    parser.add_argument("--stage-3", help="the x4 upscaler's folder or hub id (optional)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 elsewhere")
    auto = ("auto",) if offload_default == "auto" else ()
    parser.add_argument("--offload", choices=OFFLOAD + auto, default=offload_default,
                        help="CPU offload of the models, to an accelerator (--device cuda)"
                        + ("; auto: from the free GPU memory, none on the CPU" if auto else ""))  # fmt: skip
    parser.add_argument("--quantize-text-encoder", choices=tuple(TEXT_ENCODER_QUANTIZATIONS),
                        help="load T5 quantized: int8 (torchao's int8 weight-only, the [quantization] extra; "
                        "T5-XXL in 4.9 GB) or nf4 (bitsandbytes' 4-bit NormalFloat; 6.3 GB, its wo layers kept in "
                        "float32); default: as stored (11.5 GB in float16)")  # fmt: skip


def add_sampling_arguments(parser: argparse.ArgumentParser, per_prompt: str = "") -> None:
    """--negative-prompt, --steps, --guidance, --low-res-consistency, --seed, --num-images (`per_prompt` notes
    where a prompt file's own fields replace them)."""
    parser.add_argument("--negative-prompt", help="what not to draw" + per_prompt)
    parser.add_argument("--steps", type=int, help="denoising steps of every stage (default: the original's presets; "
                        "for the bundled demo model, the faster ones its quality is measured with)")  # fmt: skip
    parser.add_argument("--guidance", type=float, help="guidance scale of stages I and II (default: the original's; "
                        "for the bundled demo model, stage I's 2 and stage II's 6 its quality is measured with)")  # fmt: skip
    parser.add_argument("--low-res-consistency", type=int, metavar="N",
                        help="stage II's low_res_consistency_factor: after each step, hold its samples' content coarser "
                        "than N output pixels to stage I's images (ILVR; 0: off; default: off, or 4 for the bundled "
                        "demo model, as its quality is measured)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="image k of a prompt is drawn with seed + k" + per_prompt)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt" + per_prompt)


def check_sampling_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse's exit 2 with one message for a number no model could take (before anything loads)."""
    for option, value in (("--num-images", args.num_images), ("--steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"{option} {value}: expected an int >= 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        parser.error(f"--guidance {args.guidance}: expected a finite number (> 1 enables guidance)")
    if args.low_res_consistency is not None and (args.low_res_consistency < 0 or args.low_res_consistency == 1):
        parser.error(f"--low-res-consistency is {args.low_res_consistency}; expected 0 (off) or an int >= 2 that "
                     "divides stage II's output size")  # fmt: skip
    if not 0 <= args.seed <= MAX_SEED + 1 - args.num_images:  # seeds seed, ..., seed + num_images - 1
        parser.error(f"--seed {args.seed}: expected an int in [0, {MAX_SEED + 1 - args.num_images}]")


def resolve_device(device: str | None, dtype: str | None, offload: str = "none") -> tuple[torch.device, torch.dtype]:
    """The `--device` (default: cuda when available) and `--dtype` (default: float16 on CUDA, float32 elsewhere);
    ValueError naming the option for a device this machine does not have, or for `--offload` without an
    accelerator to offload to."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a device name; expected cpu, cuda, cuda:N, mps, ...") from None
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    if parsed.type != "cpu" and not (backend is not None and backend.is_available()):
        raise ValueError(f"--device {device}: this machine has no {parsed.type} device (torch {torch.__version__}); "
                         "leave --device out to use what it has, or pass --device cpu")  # fmt: skip
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} {parsed.type} device(s), numbered from 0")
    if offload != "none" and parsed.type == "cpu":
        raise ValueError(f"--offload {offload} moves models between the CPU and an accelerator; on --device {device} "
                         "there is none: leave --offload at none")  # fmt: skip
    return parsed, getattr(torch, dtype or ("float16" if parsed.type == "cuda" else "float32"))


def check_output_file(path: Path, option: str = "--output") -> None:
    """An image file that can be written: a suffix PIL saves (.png, .jpg, ...), in a folder that exists or can be
    created. ValueError naming the option otherwise, before anything loads."""
    suffix = path.suffix.lower()
    if PIL.Image.registered_extensions().get(suffix) not in PIL.Image.SAVE:
        raise ValueError(f"{option} {str(path)!r}: {'no' if not suffix else 'the unknown'} image file extension "
                         f"{suffix!r}; expected .png, .jpg, .webp, ... (e.g. {path.with_suffix('.png')})")  # fmt: skip
    check_writable_parent(path, option)


def check_writable_parent(path: Path, option: str) -> None:
    """The folder that will hold `path` exists as a writable folder, or can be created (its nearest existing
    ancestor is a writable folder)."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option} {str(path)!r}: cannot create a folder there, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(path)!r}: {ancestor} is not writable")


def model_ids(args: argparse.Namespace) -> dict[str, str | None]:
    """What was loaded, as recorded beside the images: hub ids as given, folders as given but normalised (`./m/` is
    `m`), the bundled model by name."""

    def named(source: str | None) -> str | None:
        return os.path.normpath(source) if source is not None and Path(source).exists() else source

    return {
        "model": named(args.model) or BUNDLED_MODEL,
        "stage_2": named(args.stage_2),
        "stage_3": named(args.stage_3),
    }


def load_cascade(args: argparse.Namespace, dtype: torch.dtype, device: torch.device,
                 prompts: list[str]) -> IFCascadePipeline:  # fmt: skip
    """The cascade the options name, moved to `device` or offloaded to it; ValueError for inconsistent model options
    or a --quantize-text-encoder this machine cannot run (checked first), HubAccessError (an OSError) for a hub id
    the Hub refuses. For the bundled model, warns (stderr) about words of `prompts` it does not know."""
    from .pipelines import IFCascadePipeline
    from .pipelines.hub_access import check_hub_access

    quantization = {} if args.quantize_text_encoder is None else {
        "quantization_config": text_encoder_quantization(args.quantize_text_encoder, device, dtype)}  # fmt: skip
    for option, source in (("--model", args.model), ("--stage-2", args.stage_2), ("--stage-3", args.stage_3)):
        if source is not None:
            check_hub_access(option, source)
    if args.model is None:
        if args.stage_2 is not None or args.stage_3 is not None:
            raise ValueError("--stage-2 and --stage-3 need --model (stage I's folder or hub id)")
        unknown = list(dict.fromkeys(word for prompt in prompts for word in demo_cascade.unknown_words(prompt)))
        if unknown:
            named = f"{unknown[:MAX_NAMED_WORDS]}" + (f" and {len(unknown) - MAX_NAMED_WORDS} more" if len(unknown) >
                                                      MAX_NAMED_WORDS else "")  # fmt: skip
            print(f"warning: the bundled demo model knows only the words of its shape captions; {named} are unknown "
                  f"to it. Known words: {' '.join(shapes.caption_vocabulary())}", file=sys.stderr)  # fmt: skip
        pipeline = demo_cascade.load_demo_cascade(dtype, **quantization)
    elif args.stage_2 is None:
        if args.stage_3 is not None:
            raise ValueError("--stage-3 needs --stage-2 (and --model as stage I)")
        pipeline = IFCascadePipeline.from_pretrained(args.model, **dtype_argument(dtype), **quantization)
    else:
        pipeline = IFCascadePipeline.from_pretrained_stages(args.model, args.stage_2, args.stage_3,
                                                            **dtype_argument(dtype), **quantization)  # fmt: skip
    return place(pipeline, args.offload, device)


def place(pipeline: IFCascadePipeline, offload: str, device: torch.device) -> IFCascadePipeline:
    """The pipeline on `device`, or offloaded to it ("model", "sequential")."""
    if offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)
    return pipeline


def call_settings(args: argparse.Namespace, has_stage_3: bool, mode: str = "text2img") -> dict[str, Any]:
    """The cascade's per-stage keyword arguments the options set: --steps, --guidance, --low-res-consistency, and for
    the bundled model in text-to-image the presets its quality is measured with (which --steps and --guidance
    replace)."""
    steps = {} if args.steps is None else {f"stage_{n}_num_inference_steps": args.steps for n in (1, 2, 3)}
    if not has_stage_3:
        steps.pop("stage_3_num_inference_steps", None)
    guidance = {} if args.guidance is None else {"stage_1_guidance_scale": args.guidance,
                                                 "stage_2_guidance_scale": args.guidance}  # fmt: skip
    presets = {}
    if args.model is None and mode == "text2img":
        presets = {**({} if steps else demo_cascade.QUALITY_STEPS),
                   **({} if guidance else demo_cascade.QUALITY_GUIDANCE), **demo_cascade.QUALITY_STAGE_2}  # fmt: skip
    if args.low_res_consistency is not None:  # replaces the bundled model's preset
        presets["stage_2_low_res_consistency_factor"] = args.low_res_consistency or None
    return {**presets, **steps, **guidance}


def image_seeds(seed: int, count: int) -> list[int]:
    """The seeds of the `count` images of one prompt: `seed`, `seed + 1`, ..."""
    return [seed + k for k in range(count)]


def generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per image (diffusers' convention for reproducible batches), on `device`, where the models run
    (the accelerator, under offload too)."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]
