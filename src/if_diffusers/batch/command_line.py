"""`if-diffusers batch PROMPTS -o FOLDER`: every prompt of a file through the IF cascade, into an `imagefolder`
dataset, on one or many processes (GPUs, machines) with accelerate."""

from __future__ import annotations

import argparse

from .. import generation_options as options

DESCRIPTION = "A file of prompts -> an imagefolder dataset of images, on one process or many (accelerate)."
EPILOG = """\
prompt file: .txt (one prompt a line) or .jsonl, one object a line: {"prompt": "...", "negative_prompt": "...",
"seed": 7, "num_images": 2, "mode": "img2img", "image": "in/7.png", "mask": "in/7-mask.png",
"stage_1_guidance_scale": 5, ...} (every field but prompt optional; per-stage settings under IFCascadePipeline's
keyword names). Image k of a line is drawn with seed + k; a line without a seed gets one derived from --seed and its
line number. Output: FOLDER/00000001-000.png ... with their parameters in the PNG text, and FOLDER/metadata.jsonl
(datasets.load_dataset("imagefolder", data_dir=FOLDER)). Rerun the same command to finish an interrupted run.

  if-diffusers batch prompts.txt -o shapes --batch-size 8
  accelerate launch --num_processes 4 -m if_diffusers batch prompts.jsonl -o out --model IF-cascade
  python -m torch.distributed.run --nproc_per_node 2 -m if_diffusers batch prompts.txt -o out --device cpu
"""
JSONL_FIELDS = " (a .jsonl line's own field replaces it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", help="a .txt file (one prompt a line) or a .jsonl file (one object a line)")
    parser.add_argument("-o", "--output", required=True, help="the dataset folder (new, or of an earlier run)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per cascade call on each process")
    options.add_model_arguments(parser)
    options.add_sampling_arguments(parser, per_prompt=JSONL_FIELDS)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the options (exit 2), then run on this process's share (`runner.run_batch`)."""
    from .runner import run_batch

    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected an int >= 1")
    options.check_sampling_arguments(parser, args)
    return run_batch(args)
