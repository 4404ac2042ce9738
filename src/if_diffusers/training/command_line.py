"""The training command line, `if-diffusers train` (and `scripts/train.py`): fine-tune a saved stage I or II pipeline
folder on a folder of captioned images (`CaptionedImageFolder`) or on the synthetic shapes.

    if-diffusers train --model IF-I-M-diffusers --stage I --train-data my-images --resolution 64 \\
        --output-dir runs/mine --max-train-steps 2000 --mixed-precision bf16 --validation-prompt "a red circle"
    accelerate launch scripts/train.py --model ... (several GPUs, same options)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from .data import CaptionedImageFolder
from .trainer import LR_SCHEDULERS, MIXED_PRECISION, STAGES, TrainingConfig, train

DESCRIPTION = "Fine-tune (or LoRA-tune) a stage I or II IF pipeline on captioned images."
_DEFAULTS = {f.name: f.default for f in fields(TrainingConfig) if f.default is not MISSING}
# TrainingConfig fields set from the option of the same name (dashes for underscores)
_NUMBERS = {"train_batch_size": int, "max_train_steps": int, "learning_rate": float,
            "gradient_accumulation_steps": int, "checkpointing_steps": int, "validation_steps": int, "seed": int,
            "text_dropout": float, "lora_rank": int, "max_sequence_length": int, "dataloader_num_workers": int,
            "lr_warmup_steps": int, "adam_weight_decay": float, "max_grad_norm": float,
            "snr_gamma": float, "noise_offset": float, "timestep_bias_portion": float,
            "timestep_bias_multiplier": float, "max_noise_level": int, "low_res_blur": float}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python scripts/train.py ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="if-diffusers train", description=DESCRIPTION)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options, on `parser` (defaults are `TrainingConfig`'s)."""
    parser.add_argument(
        "--model", required=True, help="saved IFPipeline (stage I) or IFSuperResolutionPipeline folder"
    )
    parser.add_argument("--stage", choices=STAGES, required=True)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--train-data", help="folder of images + captions.jsonl or captions.csv (see CaptionedImageFolder)"
    )
    data.add_argument("--synthetic-shapes", type=int, metavar="N", help="train on N synthetic captioned shapes")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resolution", type=int, required=True, help="image side (stage II: of the targets)")
    for name, kind in _NUMBERS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=_DEFAULTS[name])
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=_DEFAULTS["mixed_precision"])
    parser.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=_DEFAULTS["lr_scheduler"])
    parser.add_argument("--ema-decay", type=float, default=_DEFAULTS["ema_decay"])
    parser.add_argument("--no-ema", action="store_true", help="train without an EMA of the weights")
    parser.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts")
    parser.add_argument("--embedding-cache-dir", help="folder caching the captions' T5 embeddings across runs")
    parser.add_argument("--resume-from-checkpoint", help="'latest' or a checkpoint folder")
    parser.add_argument("--overwrite-output-dir", action="store_true")


def run_train(args: argparse.Namespace) -> int:
    """Check the options and data, load the pipeline, train; errors are one line on stderr and exit code 1."""
    from ..pipelines import IFPipeline, IFSuperResolutionPipeline

    try:
        config = TrainingConfig(
            stage=args.stage, output_dir=args.output_dir, resolution=args.resolution,
            mixed_precision=args.mixed_precision, lr_scheduler=args.lr_scheduler,
            ema_decay=None if args.no_ema else args.ema_decay,
            validation_prompts=args.validation_prompts, embedding_cache_dir=args.embedding_cache_dir,
            resume_from_checkpoint=args.resume_from_checkpoint, overwrite_output_dir=args.overwrite_output_dir,
            **{name: getattr(args, name) for name in _NUMBERS},
        )  # fmt: skip
        dataset = _dataset(args)
        pipeline_class = IFPipeline if args.stage == "I" else IFSuperResolutionPipeline
        pipeline = pipeline_class.from_pretrained(args.model)
        if pipeline.tokenizer is None or pipeline.text_encoder is None:
            raise ValueError(f"--model {args.model!r} has no tokenizer/text_encoder; training encodes the captions")
        folder = train(config, pipeline.unet, pipeline.tokenizer, pipeline.text_encoder, dataset, pipeline.scheduler)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {folder}")
    return 0


def _dataset(args: argparse.Namespace):
    if args.train_data is not None:
        return CaptionedImageFolder(args.train_data, args.resolution)
    from ..synthetic.shapes import ShapesDataset

    if args.synthetic_shapes < 1:
        raise ValueError(f"--synthetic-shapes {args.synthetic_shapes}: expected a positive count")
    return ShapesDataset(args.synthetic_shapes, seed=args.seed, size=args.resolution)


if __name__ == "__main__":
    sys.exit(main())
