"""The `if-diffusers` command line.

    if-diffusers generate "a red circle on a blue background" -o out.png   # the bundled demo model, on the CPU
    if-diffusers generate "a red circle on a blue background" -o out.png --model IF-cascade
    if-diffusers generate "a watercolour" --mode img2img --image photo.png --model DeepFloyd/IF-I-XL-v1.0 \\
        --stage-2 DeepFloyd/IF-II-L-v1.0 --stage-3 stabilityai/stable-diffusion-x4-upscaler --offload model
    if-diffusers convert --checkpoint IF-I-XL-v1.0 --output IF-I-XL-diffusers --variant fp16 --validate
    if-diffusers train --help

`generate` runs `IFCascadePipeline` and writes image files; `convert` is the checkpoint conversion
(`if_diffusers.conversion.command_line`); `train` trains or fine-tunes a UNet (`if_diffusers.training.command_line`). Errors are one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import PIL.Image

from . import demo_cascade
from .conversion import command_line as convert_command
from .image_processing import image_grid
from .synthetic import shapes
from .training import command_line as train_command

OFFLOAD = ("none", "model", "sequential")
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("text2img", "img2img", "inpaint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="if-diffusers", description="DeepFloyd IF for diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="prompt -> image files, through the whole IF cascade")
    _generate_arguments(generate)
    convert = commands.add_parser("convert", help=convert_command.DESCRIPTION, description=convert_command.DESCRIPTION)
    convert_command.add_arguments(convert)
    train = commands.add_parser("train", help=train_command.DESCRIPTION, description=train_command.DESCRIPTION)
    train_command.add_train_arguments(train)
    args = parser.parse_args(argv)
    if args.command == "convert":
        return convert_command.run(convert, args)
    if args.command == "train":
        return train_command.run_train(args)
    return run_generate(generate, args)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to draw")
    parser.add_argument("-o", "--output", default="out.png", help="image file to write (default out.png)")
    parser.add_argument("--model", help="a saved IFCascadePipeline folder, or stage I's folder or hub id (with "
                        "--stage-2); default: the demo cascade bundled in the package (32x32 -> 128x128 shapes)")  # fmt: skip
    parser.add_argument("--stage-2", help="stage II's folder or hub id, when --model is stage I's")
    parser.add_argument("--stage-3", help="the x4 upscaler's folder or hub id (optional)")
    parser.add_argument("--mode", choices=MODES, default="text2img")
    parser.add_argument("--image", help="img2img / inpaint: the source image file")
    parser.add_argument("--mask", help="inpaint: the mask image file (white where to repaint)")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, help="denoising steps of every stage (default: the original's presets; "
                        "for the bundled demo model, the faster ones its quality is measured with)")  # fmt: skip
    parser.add_argument("--guidance", type=float, help="guidance scale of stages I and II (default: the original's; "
                        "for the bundled demo model, stage I's 2 and stage II's 6 its quality is measured with)")  # fmt: skip
    parser.add_argument("--low-res-consistency", type=int, metavar="N",
                        help="stage II's low_res_consistency_factor: after each step, hold its samples' content coarser "
                        "than N output pixels to stage I's images (ILVR; 0: off; default: off, or 4 for the bundled "
                        "demo model, as its quality is measured)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=1, help="images to make (saved one by one and as a grid)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 elsewhere")
    parser.add_argument("--offload", choices=OFFLOAD, default="none", help="CPU offload of the models (CUDA)")
    parser.add_argument("--save-intermediates", action="store_true", help="also save each earlier stage's images")


def run_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the arguments (before loading anything), load the cascade, generate and save; 0 on success."""
    import torch

    if args.mode != "text2img" and args.image is None:
        parser.error(f"--mode {args.mode} needs --image")
    if args.mode == "inpaint" and args.mask is None:
        parser.error("--mode inpaint needs --mask")
    if args.mode != "inpaint" and args.mask is not None:
        parser.error("--mask is for --mode inpaint")
    if args.num_images < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--num-images and --steps must be positive")
    if args.low_res_consistency is not None and (args.low_res_consistency < 0 or args.low_res_consistency == 1):
        parser.error(f"--low-res-consistency is {args.low_res_consistency}; expected 0 (off) or an int >= 2 that "
                     "divides stage II's output size")  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    try:
        image = _open(args.image, "RGB", "--image") if args.image else None
        mask = _open(args.mask, "L", "--mask") if args.mask else None
        pipeline = _load(args, dtype)
        if args.offload == "model":
            pipeline.enable_model_cpu_offload(device=device)
        elif args.offload == "sequential":
            pipeline.enable_sequential_cpu_offload(device=device)
        else:
            pipeline.to(device)
        steps = {} if args.steps is None else {f"stage_{n}_num_inference_steps": args.steps for n in (1, 2, 3)}
        guidance = {} if args.guidance is None else {"stage_1_guidance_scale": args.guidance,
                                                     "stage_2_guidance_scale": args.guidance}  # fmt: skip
        presets = {}
        if args.model is None and args.mode == "text2img":
            # the bundled model's presets, at which its scores are measured (--steps and --guidance replace theirs)
            presets = {**({} if steps else demo_cascade.QUALITY_STEPS),
                       **({} if guidance else demo_cascade.QUALITY_GUIDANCE), **demo_cascade.QUALITY_STAGE_2}  # fmt: skip
        if args.low_res_consistency is not None:  # replaces the bundled model's preset
            presets["stage_2_low_res_consistency_factor"] = args.low_res_consistency or None
        if not pipeline.has_stage_3:
            steps.pop("stage_3_num_inference_steps", None)
        output = pipeline(
            args.prompt, image=image, mask_image=mask, negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.num_images, generator=torch.Generator(device).manual_seed(args.seed),
            return_intermediates=args.save_intermediates, **presets, **steps, **guidance,
        )  # fmt: skip
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in save_images(Path(args.output), output):
        print(f"wrote {path}")
    return 0


def _load(args: argparse.Namespace, dtype):
    from .pipelines import IFCascadePipeline

    if args.model is None:
        if args.stage_2 is not None or args.stage_3 is not None:
            raise ValueError("--stage-2 and --stage-3 need --model (stage I's folder or hub id)")
        unknown = demo_cascade.unknown_words(args.prompt)
        if unknown:
            print(f"warning: the bundled demo model knows only the words of its shape captions; {unknown} are unknown "
                  f"to it. Known words: {' '.join(shapes.caption_vocabulary())}", file=sys.stderr)  # fmt: skip
        return demo_cascade.load_demo_cascade(torch_dtype=dtype)
    if args.stage_2 is None:
        if args.stage_3 is not None:
            raise ValueError("--stage-3 needs --stage-2 (and --model as stage I)")
        return IFCascadePipeline.from_pretrained(args.model, torch_dtype=dtype)
    return IFCascadePipeline.from_pretrained_stages(args.model, args.stage_2, args.stage_3, torch_dtype=dtype)


def _open(path: str, mode: str, option: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"{option} {path!r}: cannot read the image ({error})") from error


def save_images(output: Path, result) -> list[Path]:
    """Write the final images to `output` (one image) or `output-0.png`, ... plus `output-grid.png` (several), and
    with intermediates `output-stage1.png`, ...; returns the paths written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    sets = {"": result.images, "-stage1": result.stage_1_images, "-stage2": result.stage_2_images}
    written = []
    for suffix, images in sets.items():
        if not images:
            continue
        if len(images) == 1:
            written.append(_save(images[0], output.with_name(f"{output.stem}{suffix}{output.suffix}")))
            continue
        for index, image in enumerate(images):
            written.append(_save(image, output.with_name(f"{output.stem}{suffix}-{index}{output.suffix}")))
        written.append(_save(image_grid(images), output.with_name(f"{output.stem}{suffix}-grid{output.suffix}")))
    return written


def _save(image: PIL.Image.Image, path: Path) -> Path:
    image.save(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
