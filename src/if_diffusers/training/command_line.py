"""The training command line, `if-diffusers train` (and `scripts/train.py`): fine-tune stage I or II of a saved
cascade (the bundled demo by default) or of a stage pipeline folder, on a folder of captioned images or an
`imagefolder` dataset (`CaptionedImageFolder`: what `if-diffusers batch` writes), a `datasets` dataset
(`--dataset-name`), or the synthetic shapes.

    if-diffusers train --model IF-I-M-diffusers --stage I --train-data my-images --resolution 64 \\
        --output-dir runs/mine --max-train-steps 2000 --mixed-precision bf16 --validation-prompt "a red circle"
    if-diffusers batch prompts.txt -o shapes && if-diffusers train --stage II --train-data shapes --resolution 128 \\
        --output-dir runs/ii --lora-rank 4 && if-diffusers generate "a red circle" --model runs/ii/pipeline
    accelerate launch -m if_diffusers train ...                     # several GPUs, same options
    torchrun --nproc_per_node 2 -m if_diffusers train ...           # several processes, CPUs too (gloo)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, dataclass, fields
from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from ..processes import quiet_loading
from .data import CAPTION_COLUMNS, CaptionedImageFolder, load_columns_dataset
from .trainer import LR_SCHEDULERS, MIXED_PRECISION, STAGES, TrainingConfig, join_processes, train

DESCRIPTION = "Fine-tune (or LoRA-tune) a stage I or II IF pipeline on captioned images."
_DEFAULTS = {f.name: f.default for f in fields(TrainingConfig) if f.default is not MISSING}
# TrainingConfig fields set from the option of the same name (dashes for underscores)
_NUMBERS = {"train_batch_size": int, "max_train_steps": int, "learning_rate": float,
            "gradient_accumulation_steps": int, "checkpointing_steps": int, "validation_steps": int, "seed": int,
            "text_dropout": float, "lora_rank": int, "max_sequence_length": int, "dataloader_num_workers": int,
            "lr_warmup_steps": int, "adam_weight_decay": float, "max_grad_norm": float,
            "snr_gamma": float, "noise_offset": float, "pyramid_noise_discount": float,
            "coarse_noise_min_timestep": int, "timestep_bias_portion": float, "timestep_bias_multiplier": float,
            "max_noise_level": int, "low_res_blur": float}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python scripts/train.py ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="if-diffusers train", description=DESCRIPTION)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv), parser)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options, on `parser` (defaults are `TrainingConfig`'s)."""
    parser.add_argument("--model", help="a saved IFCascadePipeline folder (--stage picks the UNet to train; the result "
                        "is the cascade with that stage trained), or a saved IFPipeline (stage I) or "
                        "IFSuperResolutionPipeline folder; default: the demo cascade bundled in the package")  # fmt: skip
    parser.add_argument("--stage", choices=STAGES, required=True)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-data", help="folder of images + captions.jsonl or captions.csv, or an imagefolder "
                      "dataset (images + metadata.jsonl, as `if-diffusers batch` writes; see CaptionedImageFolder)")  # fmt: skip
    data.add_argument("--dataset-name", help="a `datasets` dataset: a folder of `save_to_disk`, or a hub id "
                      "(its train split), read from --image-column and --caption-column")  # fmt: skip
    data.add_argument("--synthetic-shapes", type=int, metavar="N", help="train on N synthetic captioned shapes")
    parser.add_argument("--image-column", help="--dataset-name's image column (default image)")
    parser.add_argument("--caption-column", help="the caption column of an imagefolder's metadata or of "
                        f"--dataset-name (default: the first of {', '.join(CAPTION_COLUMNS)} it has)")  # fmt: skip
    parser.add_argument("--resize", action="store_true", help="resize each image's short side to --resolution and "
                        "crop its centre (default: images must be --resolution square already)")  # fmt: skip
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


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Check the options and data, load the model, train; errors are one line on stderr and exit code 1 (options
    that do not fit together: argparse's exit 2, when `parser` is given)."""
    misplaced = [(option, source) for option, given, source in (
        ("--image-column", args.image_column is not None, args.dataset_name is None and "--dataset-name"),
        ("--caption-column", args.caption_column is not None, args.synthetic_shapes is not None and
         "--train-data or --dataset-name"),
        ("--resize", args.resize, args.synthetic_shapes is not None and "--train-data or --dataset-name"),
    ) if given and source]  # fmt: skip
    if misplaced:
        message = f"{misplaced[0][0]} applies to {misplaced[0][1]} only"
        if parser is not None:
            parser.error(message)
        print(f"error: {message}", file=sys.stderr)
        return 1
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
        quiet_loading(join_processes())
        model = load_training_model(args.model, args.stage)
        folder = train(config, model.unet, model.tokenizer, model.text_encoder, dataset, model.scheduler,
                       output_pipeline=model.cascade)  # fmt: skip
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if join_processes().is_main_process:  # the one that wrote them (`accelerate launch`, `torchrun`)
        print(f"wrote {folder}")
        if model.cascade is not None and folder.name != "pipeline":
            print(f"wrote {folder.parent / 'pipeline'}")
    return 0


@dataclass
class TrainingModel:
    """What training takes from a saved model: the stage's UNet and scheduler, T5, and the cascade the UNet belongs
    to (`None` for a stage pipeline folder), saved with the trained stage."""

    unet: torch.nn.Module
    scheduler: DDPMScheduler
    tokenizer: Any
    text_encoder: Any
    cascade: DiffusionPipeline | None


def load_training_model(model: str | None, stage: str) -> TrainingModel:
    """`model` (a cascade or a stage pipeline folder or hub id; `None`: the bundled demo cascade) in float32, with
    stage `stage`'s UNet to train."""
    from ..demo_cascade import load_demo_cascade
    from ..pipelines import IFCascadePipeline, IFPipeline, IFSuperResolutionPipeline

    if model is None or _is_cascade(model):
        # float32 whatever the folder stores (the bundled demo: float16; transformers 5 loads T5 as stored)
        cascade = (
            load_demo_cascade()
            if model is None
            else IFCascadePipeline.from_pretrained(model, torch_dtype=torch.float32)
        )
        number = 1 if stage == "I" else 2
        return TrainingModel(getattr(cascade, f"stage_{number}_unet"), getattr(cascade, f"stage_{number}_scheduler"),
                             cascade.tokenizer, cascade.text_encoder, cascade)  # fmt: skip
    pipeline = (IFPipeline if stage == "I" else IFSuperResolutionPipeline).from_pretrained(
        model, torch_dtype=torch.float32
    )
    if pipeline.tokenizer is None or pipeline.text_encoder is None:
        raise ValueError(f"--model {model!r} has no tokenizer/text_encoder; training encodes the captions")
    return TrainingModel(pipeline.unet, pipeline.scheduler, pipeline.tokenizer, pipeline.text_encoder, None)


def _is_cascade(model: str) -> bool:
    """Whether `model`'s `model_index.json` names `IFCascadePipeline` (as a class, or the `[file, class]` pair)."""
    from diffusers import DiffusionPipeline

    class_name = DiffusionPipeline.load_config(model).get("_class_name")
    return (class_name[-1] if isinstance(class_name, list) else class_name) == "IFCascadePipeline"


def _dataset(args: argparse.Namespace):
    if args.train_data is not None:
        return CaptionedImageFolder(args.train_data, args.resolution, args.caption_column, args.resize)
    if args.dataset_name is not None:
        return load_columns_dataset(args.dataset_name, args.image_column or "image", args.caption_column,
                                    args.resolution, args.resize)  # fmt: skip
    from ..synthetic.shapes import ShapesDataset

    if args.synthetic_shapes < 1:
        raise ValueError(f"--synthetic-shapes {args.synthetic_shapes}: expected a positive count")
    return ShapesDataset(args.synthetic_shapes, seed=args.seed, size=args.resolution)


if __name__ == "__main__":
    sys.exit(main())
