"""The `if-diffusers` command line.

    if-diffusers generate "a red circle on a blue background" -o out.png   # the bundled demo model, on the CPU
    if-diffusers generate "a red circle on a blue background" -o out.png --model IF-cascade
    if-diffusers generate "a watercolour" --mode img2img --image photo.png --model DeepFloyd/IF-I-XL-v1.0 \\
        --stage-2 DeepFloyd/IF-II-L-v1.0 --stage-3 stabilityai/stable-diffusion-x4-upscaler --offload model
    if-diffusers batch prompts.jsonl -o dataset --batch-size 8      # accelerate launch ... -m if_diffusers batch
    if-diffusers convert --checkpoint IF-I-XL-v1.0 --output IF-I-XL-diffusers --variant fp16 --validate
    if-diffusers train --help
    if-diffusers serve --port 7860                                  # the web app (the [app] extra)

`generate` runs `IFCascadePipeline` and writes image files (its options shared with `batch`:
`generation_options`); `batch` makes an imagefolder dataset from a prompt file (`if_diffusers.batch`); `convert` is
the checkpoint conversion (`if_diffusers.conversion.command_line`); `train` trains or fine-tunes a UNet
(`if_diffusers.training.command_line`). Errors are one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import PIL.Image

from . import app
from . import generation_options as options
from .batch import command_line as batch_command
from .conversion import command_line as convert_command
from .generation_record import BUNDLED_MODEL, GenerationRecord
from .image_processing import image_grid, read_image
from .training import command_line as train_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="if-diffusers", description="DeepFloyd IF for diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="prompt -> image files, through the whole IF cascade")
    _generate_arguments(generate)
    batch = commands.add_parser("batch", help=batch_command.DESCRIPTION, description=batch_command.DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=batch_command.EPILOG)  # fmt: skip
    batch_command.add_arguments(batch)
    convert = commands.add_parser("convert", help=convert_command.DESCRIPTION, description=convert_command.DESCRIPTION)
    convert_command.add_arguments(convert)
    train = commands.add_parser("train", help=train_command.DESCRIPTION, description=train_command.DESCRIPTION)
    train_command.add_train_arguments(train)
    serve = commands.add_parser("serve", help=app.DESCRIPTION, description=app.DESCRIPTION)
    app.add_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return app.run(serve, args)
    if args.command == "convert":
        return convert_command.run(convert, args)
    if args.command == "train":
        return train_command.run_train(args, train)
    if args.command == "batch":
        return batch_command.run(batch, args)
    return run_generate(generate, args)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the text to draw (not with --settings)")
    parser.add_argument("-o", "--output", default="out.png", help="image file to write (default out.png)")
    options.add_model_arguments(parser)
    parser.add_argument("--mode", choices=options.MODES, default="text2img")
    parser.add_argument("--image", help="img2img / inpaint: the source image file")
    parser.add_argument("--mask", help="inpaint: the mask image file (white where to repaint)")
    options.add_sampling_arguments(parser)
    parser.add_argument("--save-intermediates", action="store_true", help="also save each earlier stage's images")
    parser.add_argument("--settings", metavar="FILE", help="make an image again from its settings: a PNG the app "
                        "wrote, or its settings saved as .json (prompt, seed, models, every stage's arguments); "
                        "--model/--stage-2/--stage-3/--dtype may name another copy of the same models")  # fmt: skip


def run_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the arguments (before loading anything), load the cascade, generate (or, with --settings, make an image
    again) and save; 0 on success, 1 with one line on stderr for an error."""
    if args.settings is not None:
        for name in REPLAY_FIXED:
            if getattr(args, name) != parser.get_default(name):
                option = name if name == "prompt" else "--" + name.replace("_", "-")
                parser.error(f"{option} with --settings: the settings file fixes it; leave {option} out")
    else:
        if args.prompt is None:
            parser.error("the prompt is missing: give the text to draw, or --settings FILE")
        if args.mode != "text2img" and args.image is None:
            parser.error(f"--mode {args.mode} needs --image")
        if args.mode == "inpaint" and args.mask is None:
            parser.error("--mode inpaint needs --mask")
        if args.mode != "inpaint" and args.mask is not None:
            parser.error("--mask is for --mode inpaint")
        options.check_sampling_arguments(parser, args)
    try:
        options.check_output_file(Path(args.output))
        image = read_image(args.image, "RGB", "--image") if args.image else None
        mask = read_image(args.mask, "L", "--mask") if args.mask else None
        output = _replay(args, image, mask) if args.settings is not None else _generate(args, image, mask)
        written = save_images(Path(args.output), output)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


def _generate(args: argparse.Namespace, image: PIL.Image.Image | None, mask: PIL.Image.Image | None):
    device, dtype = options.resolve_device(args.device, args.dtype, args.offload)
    pipeline = options.load_cascade(args, dtype, device, [args.prompt])
    return pipeline(
        args.prompt, image=image, mask_image=mask, negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        generator=options.generators(options.image_seeds(args.seed, args.num_images), device),
        return_intermediates=args.save_intermediates, **options.call_settings(args, pipeline.has_stage_3, args.mode),
    )  # fmt: skip


REPLAY_FIXED = ("prompt", "mode", "negative_prompt", "steps", "guidance", "low_res_consistency", "seed", "num_images",
                "save_intermediates")  # fmt: skip


def _replay(args: argparse.Namespace, image: PIL.Image.Image | None, mask: PIL.Image.Image | None):
    """`generate --settings FILE`: the image the record describes, to the same pixels: its models (unless
    --model names another copy), dtype and device kind by default."""
    record = GenerationRecord.read(args.settings)
    record.check_images(image, mask)
    if args.model is None:
        recorded = {k: v for k, v in record.models.items() if v != BUNDLED_MODEL}
        args.model, args.stage_2, args.stage_3 = (recorded.get(k) for k in ("model", "stage_2", "stage_3"))
    device, dtype = options.resolve_device(args.device or record.device, args.dtype or record.dtype, args.offload)
    return record.replay(options.load_cascade(args, dtype, device, [record.prompt]), image, mask)


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
