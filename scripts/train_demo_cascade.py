"""Train the small demo IF cascade on the synthetic shapes with `if_diffusers.training`, then measure it.

Stage I learns 64x64 images from the captions. Stage II, the x4 super-resolution UNet, is trained on 64x64 targets
(16x16 low-res inputs): the UNet is convolutional and 4x upsampling blurs edges over the same few pixels at any
scale, so it learns the sharpening it then applies from 64 to 256 at a sixteenth of the cost. T5 is a tiny random
encoder from a fixed seed (frozen). Everything is seeded: the same arguments give the same weights on one machine.

    python scripts/train_demo_cascade.py --output demo-cascade --stage-1-steps 3000 --stage-2-steps 1000
    python scripts/train_demo_cascade.py --output demo-cascade --evaluate-only   # scores of a trained folder

Writes `OUTPUT/cascade` (an `IFCascadePipeline` without stage III, weights stored in float16) and prints the
analyser's scores on held-out captions, for the trained cascade and for the same architecture with random weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from if_diffusers import IFCascadePipeline, IFPipeline, IFSuperResolutionPipeline
from if_diffusers.demo_cascade import (
    DEMO_SEED,
    STAGE_1_SIZE,
    demo_text_encoder,
    demo_tokenizer,
    demo_unet,
    quality_scores,
)
from if_diffusers.scheduling import denoising_scheduler, noising_scheduler
from if_diffusers.synthetic.shapes import ShapesDataset
from if_diffusers.training import TrainingConfig, train

MAX_TOKENS = 32  # the longest caption (two-tone background) is 23 tokens
QUALITY_CALL = dict(stage_1_timesteps="smart50", stage_2_timesteps="smart27", max_sequence_length=MAX_TOKENS,
                    output_type="pil")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="working folder: checkpoints, stages, the cascade")
    parser.add_argument("--stage-1-steps", type=int, default=3000)
    parser.add_argument("--stage-2-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--evaluation-count", type=int, default=64, help="held-out captions to score (>= 64)")
    parser.add_argument("--evaluate-only", action="store_true", help="score OUTPUT/cascade without training")
    parser.add_argument("--resume", action="store_true", help="resume each stage from its last checkpoint")
    args = parser.parse_args(argv)
    output = Path(args.output)
    tokenizer = demo_tokenizer()
    text_encoder = demo_text_encoder(len(tokenizer))
    if not args.evaluate_only:
        stages = [train_stage(stage, steps, output, tokenizer, text_encoder, args)
                  for stage, steps in (("I", args.stage_1_steps), ("II", args.stage_2_steps))]  # fmt: skip
        cascade = IFCascadePipeline.from_stages(IFPipeline.from_pretrained(stages[0]),
                                                IFSuperResolutionPipeline.from_pretrained(stages[1]))  # fmt: skip
        cascade.to(torch.float16).save_pretrained(output / "cascade")
    trained = IFCascadePipeline.from_pretrained(output / "cascade", torch_dtype=torch.float32)
    size = sum(f.stat().st_size for f in (output / "cascade").rglob("*") if f.is_file()) / 2**20
    scores = {
        "trained": score(trained, args.evaluation_count),
        "random weights": score(random_like(trained), args.evaluation_count),
    }
    scores["files_mib"] = round(size, 2)
    print(json.dumps(scores, indent=2))
    (output / "scores.json").write_text(json.dumps(scores, indent=2))
    return 0


def train_stage(stage: str, steps: int, output: Path, tokenizer, text_encoder, args) -> Path:
    """Train the demo's stage `stage` UNet for `steps` steps; returns its pipeline folder."""
    config = TrainingConfig(
        stage=stage, output_dir=str(output / f"stage_{stage}"), resolution=STAGE_1_SIZE,
        train_batch_size=args.batch_size, max_train_steps=steps, learning_rate=args.learning_rate,
        lr_warmup_steps=min(100, steps // 10), ema_decay=0.999, checkpointing_steps=max(100, steps // 10),
        seed=DEMO_SEED, max_sequence_length=MAX_TOKENS, resume_from_checkpoint="latest" if args.resume else None,
        overwrite_output_dir=not args.resume,
    )  # fmt: skip
    dataset = ShapesDataset(steps * args.batch_size, seed=DEMO_SEED, size=STAGE_1_SIZE)
    start = time.perf_counter()
    folder = train(config, demo_unet(stage), tokenizer, text_encoder, dataset, denoising_scheduler(stage))
    print(f"stage {stage}: {steps} steps of {args.batch_size} in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def random_like(cascade: IFCascadePipeline) -> IFCascadePipeline:
    """The cascade's architecture with the UNets' random initial weights: the chance-level reference."""
    return IFCascadePipeline(**{**cascade.components, "stage_1_unet": demo_unet("I"), "stage_2_unet": demo_unet("II"),
                                "stage_2_image_noising_scheduler": noising_scheduler()}, requires_safety_checker=False)  # fmt: skip


def score(cascade: IFCascadePipeline, count: int) -> dict:
    cascade.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    scores = quality_scores(cascade, count=count, **QUALITY_CALL)
    scores["seconds"] = round(time.perf_counter() - start, 1)
    return scores


if __name__ == "__main__":
    sys.exit(main())
