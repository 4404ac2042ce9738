"""Train the small demo IF cascade on the synthetic shapes with `if_diffusers.training`, then measure it.

Stage I learns 32x32 images from the captions (predicting epsilon, as IF), then goes on for a few hundred steps
with noise that hides its images' coarse layout to less noisy steps, in the noisier half of the steps only
(`tune_stage_1`: the backgrounds' colours). Stage II, the x4 super-resolution UNet, predicts v: it learns 64x64
crops of 128x128 renderings from their 16x16 downsamples (`demo_cascade.SuperResolutionCrops`, colours jittered off
the palette), and upsamples whole 32x32 images to 128x128 (on request it goes on to whole renderings,
`--stage-2-whole-steps`, as the earlier releases did after 32x32 crops). T5 is a tiny random encoder from a fixed
seed (frozen). Everything is seeded: the same arguments give the same weights on one machine (measured: bitwise).

    python scripts/train_demo_cascade.py --output demo-cascade --bundle   # what ships in the package
    python scripts/train_demo_cascade.py --output demo-cascade --evaluate-only   # scores of a trained folder
    python scripts/train_demo_cascade.py --output tuned --stage-1 STAGE_I --stage-2 STAGE_II --evaluation-count 0
                                                  # only the tune phase of stage I, on trained stages

Writes `OUTPUT/cascade` (an `IFCascadePipeline` without stage III, weights stored in float16), with `--bundle` also
the package's bundled demo model (`src/if_diffusers/demo_model`, replaced atomically), and prints the analyser's
scores on held-out captions (`OUTPUT/scores.json`), for the trained cascade and for the same architecture with
random weights. `scripts/benchmark_demo_cascade.py` prints the same scores for the bundled model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from if_diffusers import IFCascadePipeline, IFPipeline, IFSuperResolutionPipeline
from if_diffusers.atomic_folder import atomic_folder
from if_diffusers.demo_cascade import (
    BUNDLED_MODEL_FOLDER,
    DEMO_SEED,
    STAGE_1_SIZE,
    STAGE_2_SIZE,
    SUPER_RESOLUTION_CROP,
    SuperResolutionCrops,
    benchmark_scores,
    demo_text_encoder,
    demo_tokenizer,
    demo_unet,
)
from if_diffusers.scheduling import PREDICTION_TYPES, denoising_scheduler
from if_diffusers.synthetic.shapes import ShapesDataset
from if_diffusers.training import TrainingConfig, train
from if_diffusers.training.trainer import LR_SCHEDULERS, MIXED_PRECISION

PACKAGE_MODEL = Path(__file__).resolve().parents[1] / "src" / "if_diffusers" / BUNDLED_MODEL_FOLDER
# The tune phase's coarse noise only from this step on: below it stage I draws the shapes' detail (the fourteenth
# release, coarse at every step, drew 9 in 100 fewer shapes right). Chosen on stream 2 (model card): 700 or 500.
COARSE_NOISE_MIN_TIMESTEP = 500


def argument_parser() -> argparse.ArgumentParser:
    """The script's options; their defaults reproduce the bundled model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="working folder: checkpoints, stages, the cascade")
    parser.add_argument("--stage-1-steps", type=int, default=4000)
    parser.add_argument("--stage-2-steps", type=int, default=3000, help="stage II's steps on crops")
    parser.add_argument("--batch-size", type=int, default=32, help="stage I's")
    parser.add_argument("--stage-2-batch-size", type=int, default=8, help="stage II's, on crops")
    parser.add_argument("--stage-2-crop", type=int, default=SUPER_RESOLUTION_CROP,
                        help="side of stage II's training crops of its 128x128 targets (a multiple of 4; 128: whole images)")  # fmt: skip
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="cosine", help="both stages")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="bf16",
                        help="both stages (bf16: 1.7x faster than float32 on a CPU with AMX or AVX512-BF16)")  # fmt: skip
    # The defaults reproduce the bundled model: stage I with Min-SNR 5 and offset noise 0.1; stage II predicting v,
    # with augmentation levels below 350 (without which it learns to ignore its low-res input), on 64x64 crops (see
    # the model card).
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="stage I's Min-SNR gamma (0: none)")
    parser.add_argument("--noise-offset", type=float, default=0.1, help="stage I's offset noise")
    parser.add_argument("--timestep-bias", type=float, nargs=2, default=(0.0, 1.0), metavar=("PORTION", "MULTIPLIER"),
                        help="both stages: draw the noisiest PORTION of the steps MULTIPLIER times as often")  # fmt: skip
    parser.add_argument("--max-noise-level", type=int, default=350,
                        help="stage II: cap on the low-res augmentation level (TrainingConfig.max_noise_level; 1000: none)")  # fmt: skip
    parser.add_argument("--stage-2-blur", type=float, default=0.0,
                        help="stage II: largest blur of the low-res input, in 32x32 pixels (TrainingConfig.low_res_blur; 0: none)")  # fmt: skip
    parser.add_argument("--stage-2-snr-gamma", type=float, default=0.0, help="stage II's Min-SNR gamma (0: none)")
    parser.add_argument("--stage-2-noise-offset", type=float, default=0.0, help="stage II's offset noise")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon", help="stage I's")
    parser.add_argument("--stage-2-prediction-type", choices=PREDICTION_TYPES, default="v_prediction",
                        help="stage II's (with 'epsilon' its samples drift in colour; see the model card)")  # fmt: skip
    parser.add_argument("--stage-2-colour-jitter", type=float, default=0.1,
                        help="stage II's colour jitter of its training images (SuperResolutionCrops.colour_jitter; 0: none)")  # fmt: skip
    parser.add_argument("--stage-2-whole-steps", type=int, default=0,
                        help="stage II's steps on whole 128x128 images after its crop steps (0: none; 600 after 32x32 crops)")  # fmt: skip
    parser.add_argument("--stage-2-whole-batch-size", type=int, default=4)
    parser.add_argument("--stage-2-whole-learning-rate", type=float, default=2e-4)
    parser.add_argument("--stage-1", type=Path, default=None, metavar="FOLDER",
                        help="a trained stage-I pipeline folder to use instead of training stage I")  # fmt: skip
    # Stage I's backgrounds: it goes on training with noise that hides the coarse layout (the background's colours and
    # split) up to less noisy steps, where the loss weighs it (see `tune_stage_1`).
    parser.add_argument("--stage-1-tune-steps", type=int, default=800,
                        help="stage I's further steps on other records with --stage-1-tune-noise-offset and "
                             "--stage-1-tune-pyramid-noise (0: none, as up to the thirteenth release)")  # fmt: skip
    parser.add_argument("--stage-1-tune-noise-offset", type=float, default=0.5)
    parser.add_argument("--stage-1-tune-pyramid-noise", type=float, default=0.9,
                        help="the tune phase's TrainingConfig.pyramid_noise_discount (0: none)")  # fmt: skip
    parser.add_argument("--stage-1-tune-coarse-noise-min-timestep", type=int, default=COARSE_NOISE_MIN_TIMESTEP,
                        help="the tune phase's TrainingConfig.coarse_noise_min_timestep: the offset and pyramid "
                             "noise only from this step on, i.i.d. noise below (0: every step)")  # fmt: skip
    parser.add_argument("--stage-1-tune-learning-rate", type=float, default=3e-4)
    parser.add_argument("--stage-2", type=Path, default=None, metavar="FOLDER",
                        help="a trained stage-II pipeline folder to use instead of training stage II")  # fmt: skip
    parser.add_argument("--evaluation-count", type=int, default=64,
                        help="held-out captions to score (0: none; score later with "
                             "benchmark_demo_cascade.py)")  # fmt: skip
    parser.add_argument("--evaluate-only", action="store_true", help="score OUTPUT/cascade without training")
    parser.add_argument("--resume", action="store_true", help="resume each stage from its last checkpoint")
    parser.add_argument("--bundle", action="store_true", help="also write the cascade into the package (demo_model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    for flag, option in (("--stage-2-colour-jitter", {"colour_jitter": args.stage_2_colour_jitter}),
                         ("--stage-2-crop", {"crop": args.stage_2_crop})):  # fmt: skip
        try:  # the dataset's own checks, before any training
            SuperResolutionCrops(0, **option)
        except ValueError as error:
            parser.error(f"{flag}: {error}")
    for flag, folder, stage in (("--stage-1", args.stage_1, "I"), ("--stage-2", args.stage_2, "II")):
        if folder is not None and not (folder / "model_index.json").is_file():
            parser.error(f"{flag} {folder}: expected a stage-{stage} pipeline folder (no model_index.json there)")
    if args.stage_2 is not None and args.stage_2_whole_steps:
        parser.error(f"--stage-2 {args.stage_2} and --stage-2-whole-steps {args.stage_2_whole_steps}: a given stage "
                     "II is used as it is; pass one of them")  # fmt: skip
    if args.evaluation_count < 0 or args.stage_1_tune_steps < 0:
        parser.error(f"--evaluation-count is {args.evaluation_count} and --stage-1-tune-steps "
                     f"{args.stage_1_tune_steps}; expected ints >= 0")  # fmt: skip
    if not 0 <= args.stage_1_tune_coarse_noise_min_timestep < 1000:
        parser.error(f"--stage-1-tune-coarse-noise-min-timestep is {args.stage_1_tune_coarse_noise_min_timestep}; "
                     "expected a step of stage I's 1000 (0 to 999)")  # fmt: skip
    output = Path(args.output)
    tokenizer = demo_tokenizer()
    text_encoder = demo_text_encoder(len(tokenizer))
    if not args.evaluate_only:
        first = args.stage_1 or train_stage("I", args.stage_1_steps, output, tokenizer, text_encoder, args)
        if args.stage_1_tune_steps:
            first = tune_stage_1(first, output, args)
        second = args.stage_2 or train_stage("II", args.stage_2_steps, output, tokenizer, text_encoder, args)
        if args.stage_2_whole_steps:
            second = train_on_whole_images(second, output, args)
        stages = [first, second]
        cascade = IFCascadePipeline.from_stages(IFPipeline.from_pretrained(stages[0]),
                                                IFSuperResolutionPipeline.from_pretrained(stages[1]))  # fmt: skip
        cascade.to(torch.float16).save_pretrained(output / "cascade")
        drop_local_paths(output / "cascade")
        if args.bundle:
            with atomic_folder(PACKAGE_MODEL, overwrite=True) as staging:
                shutil.copytree(output / "cascade", staging, dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in (output / "cascade").rglob("*") if f.is_file()) / 2**20
    if not args.evaluation_count:
        print(f"wrote {output / 'cascade'} ({size:.2f} MiB); not scored (--evaluation-count 0)")
        return 0
    trained = IFCascadePipeline.from_pretrained(output / "cascade", torch_dtype=torch.float32)
    scores = {**benchmark_scores(trained, args.evaluation_count), "files_mib": round(size, 2)}
    print(json.dumps(scores, indent=2))
    (output / "scores.json").write_text(json.dumps(scores, indent=2))
    return 0


def drop_local_paths(folder: Path) -> None:
    """Remove `_name_or_path` (the folder each model was loaded from: this run's scratch paths) from the configs
    under `folder`, so a saved or bundled cascade names no path of the machine that trained it."""
    for config_file in folder.rglob("config.json"):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_on_whole_images(crop_trained: Path, output: Path, args) -> Path:
    """Go on training the crop-trained stage II (`crop_trained`, a pipeline folder) on whole 128x128 images, at a
    lower rate; returns the new pipeline folder.

    GroupNorm normalises each group of features by its mean and spread over the whole image, which differ between a
    32x32 crop (often one plain colour) and a whole image. Trained on crops alone (with IF's 32 groups, one channel
    each at this width), the UNet's one-step estimate of x_0 at t = 999 was 3.7x less accurate on whole images than
    on the same images cut into 32x32 tiles (see the model card); a few hundred whole-image steps adapt it. Crops stay
    the main phase: per step of the same cost they teach the super-resolution itself far faster than whole images.
    After 64x64 crops (the default) the phase brings nothing measurable, and is off by default.
    """
    pipeline = IFSuperResolutionPipeline.from_pretrained(crop_trained)
    steps, batch = args.stage_2_whole_steps, args.stage_2_whole_batch_size
    config = training_config(
        args, "II", output, "stage_II_whole", STAGE_2_SIZE, steps, batch, args.stage_2_whole_learning_rate,
        seed=DEMO_SEED + 1, max_noise_level=args.max_noise_level, snr_gamma=args.stage_2_snr_gamma or None,
        noise_offset=args.stage_2_noise_offset,
    )  # fmt: skip
    # other images than the crop phase's: the next seed's records, whole
    dataset = SuperResolutionCrops(steps * batch, seed=DEMO_SEED + 1, crop=STAGE_2_SIZE,
                                   colour_jitter=args.stage_2_colour_jitter)  # fmt: skip
    start = time.perf_counter()
    folder = train(config, pipeline.unet, pipeline.tokenizer, pipeline.text_encoder, dataset, pipeline.scheduler)
    print(f"stage II on whole images: {steps} steps of {batch} in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def tune_stage_1(trained: Path, output: Path, args) -> Path:
    """Go on training stage I (`trained`, a pipeline folder) for `--stage-1-tune-steps` on other records (those of
    seed 2), with noise that hides its images' coarse layout up to less noisy steps; returns the new pipeline
    folder.

    With i.i.d. noise a 32x32 image's mean colour and halves stay readable from the noisy image until about step 950
    of 1000, where the epsilon loss weighs the prediction of x_0 by the SNR (below 0.006): stage I's one-step estimate
    at step 999 named 40 of 83 plain backgrounds right, black drawn navy and white cream (model card). A larger offset
    (`noise_offset`) and coarser noise (`pyramid_noise_discount`) hide them up to steps the loss weighs. Below
    `--stage-1-tune-coarse-noise-min-timestep` (500) the noise stays i.i.d.: tuned with coarse noise at every step,
    stage I drew 9 shapes in 100 fewer right, lost in the steps below 500 (model card).
    """
    pipeline = IFPipeline.from_pretrained(trained)
    steps, batch = args.stage_1_tune_steps, args.batch_size
    config = training_config(
        args, "I", output, "stage_I_tune", STAGE_1_SIZE, steps, batch, args.stage_1_tune_learning_rate,
        seed=DEMO_SEED + 2, snr_gamma=args.snr_gamma or None, noise_offset=args.stage_1_tune_noise_offset,
        pyramid_noise_discount=args.stage_1_tune_pyramid_noise,
        coarse_noise_min_timestep=args.stage_1_tune_coarse_noise_min_timestep,
    )  # fmt: skip
    dataset = ShapesDataset(steps * batch, DEMO_SEED + 2, STAGE_1_SIZE)
    start = time.perf_counter()
    folder = train(config, pipeline.unet, pipeline.tokenizer, pipeline.text_encoder, dataset, pipeline.scheduler)
    print(f"stage I tuned: {steps} steps of {batch} in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def train_stage(stage: str, steps: int, output: Path, tokenizer, text_encoder, args) -> Path:
    """Train the demo's stage `stage` UNet for `steps` steps; returns its pipeline folder."""
    if stage == "I":
        resolution, batch_size, prediction_type = STAGE_1_SIZE, args.batch_size, args.prediction_type
        options = {"snr_gamma": args.snr_gamma or None, "noise_offset": args.noise_offset}
        dataset = ShapesDataset(steps * batch_size, DEMO_SEED, STAGE_1_SIZE)
    else:
        resolution, batch_size = args.stage_2_crop, args.stage_2_batch_size
        prediction_type = args.stage_2_prediction_type
        options = {"snr_gamma": args.stage_2_snr_gamma or None, "noise_offset": args.stage_2_noise_offset,
                   "max_noise_level": args.max_noise_level, "low_res_blur": args.stage_2_blur or None}  # fmt: skip
        dataset = SuperResolutionCrops(steps * batch_size, crop=resolution, colour_jitter=args.stage_2_colour_jitter)
    config = training_config(
        args, stage, output, f"stage_{stage}", resolution, steps, batch_size, args.learning_rate,
        seed=DEMO_SEED, timestep_bias_portion=args.timestep_bias[0], timestep_bias_multiplier=args.timestep_bias[1],
        **options,
    )  # fmt: skip
    scheduler = denoising_scheduler(stage, prediction_type)
    start = time.perf_counter()
    folder = train(config, demo_unet(stage), tokenizer, text_encoder, dataset, scheduler)
    print(f"stage {stage}: {steps} steps of {batch_size} in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def training_config(args, stage: str, output: Path, phase: str, resolution: int, steps: int, batch_size: int,
                    learning_rate: float, seed: int, **options) -> TrainingConfig:  # fmt: skip
    """The `TrainingConfig` every phase of the demo shares (schedule, precision, EMA, checkpoints, the embedding
    cache, resuming), with this phase's stage, folder (`output / phase`), image size, length, batch, rate, seed and `options`."""
    return TrainingConfig(
        stage=stage, output_dir=str(output / phase), resolution=resolution, train_batch_size=batch_size,
        max_train_steps=steps, learning_rate=learning_rate, lr_scheduler=args.lr_scheduler,
        mixed_precision=args.mixed_precision, lr_warmup_steps=min(100, steps // 10), ema_decay=0.999,
        checkpointing_steps=max(100, steps // 10), seed=seed,
        embedding_cache_dir=output / "embeddings",  # stage II's captions are among stage I's
        resume_from_checkpoint="latest" if args.resume else None, overwrite_output_dir=not args.resume, **options,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
