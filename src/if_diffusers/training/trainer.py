"""Training and fine-tuning IF's UNets (stage I, or a super-resolution stage) with the original's objective.

    config = TrainingConfig(stage="I", output_dir="runs/shapes", resolution=64, max_train_steps=10_000)
    folder = train(config, pipe.unet, pipe.tokenizer, pipe.text_encoder, CaptionedImageFolder("data", 64))
    IFPipeline.from_pretrained(folder)

What a step does (`diffusion_loss`): captions are replaced by "" at rate `text_dropout` (classifier-free guidance, as
IF trains), a timestep and noise are drawn, stage II adds the low-res conditioning (the target downsampled x4,
upsampled and noise-augmented at a random level per sample: `super_resolution_inputs`), and the loss is IF's hybrid
loss, which keeps training the learned variance (`hybrid_loss`). T5 is frozen: each distinct caption is encoded once
before training (`embed_captions`, cached on disk with `embedding_cache_dir`).

Everything runs through `accelerate.Accelerator` (mixed precision, gradient accumulation). Under `accelerate launch`
or `torchrun` with N processes (GPUs, or CPU processes over gloo) the processes form one run: each takes its slice of
every batch (`ResumableBatches`), DDP averages the gradients, and only the main process writes checkpoints' model
files, validation images, the embedding cache and the result, and shows the progress bar (the others wait). The data
is one stream, ordered by `(seed, epoch)`, and every sample's random draws (text dropout, timestep, noise,
augmentation) come from a generator of `(seed, its position in the stream)` (`sample_generators`): the same run on 1
process with batch 8 or on 2 with batch 4 sees the same samples with the same noise, and a checkpoint
(`accelerator.save_state`: model, optimizer, LR schedule, EMA, step count and stream position) resumes, on any number
of processes, where the run stopped.

Output folder layout: `checkpoints/checkpoint-N/` (every `checkpointing_steps`), `validation/step-N.png`, and at the
end `pipeline/` (a complete `save_pretrained` folder, written atomically; EMA weights when EMA is on) or, with
`lora_rank`, `lora/pytorch_lora_weights.safetensors` for `pipeline.load_lora_weights`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from packaging.version import Version
from tqdm.auto import tqdm

from ..atomic_folder import atomic_folder, check_writable_folder
from ..image_processing import image_grid, size_multiple
from ..processes import process_state
from ..scheduling import denoising_scheduler, noising_scheduler
from .data import (
    CaptionedDataset,
    CollateImages,
    IndexedItems,
    ResumableBatches,
    dataset_captions,
    embed_captions,
    image_and_caption,
    to_training_tensor,
)
from .losses import (
    MAX_BLUR,
    DiffusionSchedule,
    Generators,
    diffusion_schedule,
    downsample,
    hybrid_loss,
    min_snr_weights,
    pyramid_noise,
    q_sample,
    sample_timesteps,
    super_resolution_inputs,
    uniform,
)

# accelerate's: records from the main process only (it needs the process state: `train` makes it first)
logger = get_logger(__name__)

STAGES = ("I", "II")
MIXED_PRECISION = ("no", "fp16", "bf16")
# After the linear warm-up: keep the rate, or bring it to 0 at `max_train_steps` (half a cosine, or a line).
LR_SCHEDULERS = ("constant", "cosine", "linear")
SUPER_RESOLUTION_SCALE = 4
# The attention projections a LoRA adapts: self-attention (to_q/k/v/out) and the text keys/values (add_k/v_proj).
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
VALIDATION_TIMESTEPS = {"I": "smart27", "II": "super27"}  # the original's fast respacing presets
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# The oldest accelerate seen to resume (load_state) under torch 2.13; 0.33 (the package's minimum) cannot: torch's
# weights_only default refuses its pickled random states, and it then looks up a step it never read.
RESUME_ACCELERATE = Version("1.10.1")


@dataclass
class TrainingConfig:
    """Settings of one training run, checked on creation (ValueError naming the field).

    Args:
        stage: "I" (text -> image at `resolution`) or "II" (super-resolution to `resolution` from `resolution / 4`).
        output_dir: where checkpoints, validation images and the result go (see the module docstring); must be new
            or empty unless `overwrite_output_dir` or `resume_from_checkpoint`.
        resolution: side of the training images (stage II: of the high-res targets); images of another size are
            rejected, never resized.
        train_batch_size: images per process per micro-step; gradient_accumulation_steps micro-steps per step.
        max_train_steps: optimizer steps in all (a resumed run counts the steps already done).
        learning_rate, lr_warmup_steps (linear warm-up from 0), adam_weight_decay (AdamW), max_grad_norm
            (gradient clipping; None: none).
        lr_scheduler: after the warm-up, "constant", or down to 0 at `max_train_steps` along half a "cosine" or a
            "linear" ramp (diffusers' `get_scheduler`). A short run from scratch ends far better decayed: the last
            steps average out the noise of a large constant rate.
        mixed_precision: "no", "fp16" or "bf16" (weights stay float32, accelerate autocasts the UNet).
        ema_decay: decay of an exponential moving average of the weights (diffusers' `EMAModel`, with its warm-up
            `(1 + n) / (10 + n)`); the result holds the EMA weights. None: no EMA.
        checkpointing_steps: save the full training state every this many steps.
        validation_steps: every this many steps, sample `validation_prompts` with the stage's pipeline (stage II
            upscales the first training images, downsampled) to `validation/step-N.png`; None: never.
        seed: seeds the data order, noise, timesteps, augmentation and text dropout.
        text_dropout: probability that a caption is replaced by "" (IF trains the unconditional model this way).
        snr_gamma: weight the epsilon (or v) loss by Min-SNR-gamma (`min_snr_weights`; 5 is the paper's choice),
            which speeds up training from scratch; None (IF's objective): unweighted.
        noise_offset: standard deviation of a constant added to the noise per sample and channel ("offset noise",
            diffusers' training scripts' `--noise_offset`). i.i.d. noise leaves an image's mean colour readable up to
            the last few steps (its SNR is the pixel count times the pixel's), so a model never learns to take the
            overall colours from the text; an offset hides them earlier. 0 (IF's objective): none.
        pyramid_noise_discount: multi-resolution noise (`losses.pyramid_noise`): noise drawn at every coarser scale
            down to one pixel is added, level k weighted by this ** k, which hides the coarse layout (a two-tone
            background's halves as well as the mean colour) up to less noisy steps than `noise_offset` alone.
            0 (IF's objective): none; in [0, 1).
        coarse_noise_min_timestep: give the offset and pyramid noise only to samples drawn at this step or a
            noisier one; the others get i.i.d. noise. The coarse layout is decided in the noisiest steps; the demo's
            stage I, tuned with coarse noise at every step, lost shapes in the less noisy ones (its model card).
            0: every step.
        timestep_bias_portion, timestep_bias_multiplier: draw the noisiest `timestep_bias_portion` of the steps
            `timestep_bias_multiplier` times as often (`sample_timesteps`; diffusers' "later" timestep bias).
            0 and 1 (IF's objective): uniform.
        max_noise_level: stage II only: draw the low-res augmentation level uniformly on `[0, max_noise_level)`
            rather than on the whole augmentation schedule, as the Stable Diffusion x4 upscaler trains (350; IF's
            stage III in practice). A small super-resolution UNet trained on the whole range learns to ignore its
            low-res input early on (half of the draws leave it mostly noise); sampling uses levels well inside the
            cap (IF's stage II default is 250). None (IF's objective): the whole schedule.
        low_res_blur: stage II only: blur each downsampled low-res input with a Gaussian of standard deviation
            uniform on `[0, low_res_blur)` low-res pixels (`super_resolution_inputs`' `max_blur`; Cascaded
            Diffusion Models' conditioning augmentation), so that the UNet learns to sharpen soft inputs such as
            stage I's samples. None (IF's objective): no blur.
        lora_rank: train a LoRA of this rank on `LORA_TARGET_MODULES` instead of all weights; None: full fine-tuning.
        max_sequence_length: T5 tokens per caption (77, as IF was trained).
        embedding_cache_dir: folder caching the T5 embeddings of the captions across runs; None: no cache.
        resume_from_checkpoint: "latest" (the highest `checkpoints/checkpoint-N`, or a fresh start when there is
            none) or a checkpoint folder. The resumed steps follow this config's `learning_rate`, `lr_scheduler`
            and `max_train_steps` (a decayed run extended to more steps continues along the longer schedule).
        overwrite_output_dir: train into a non-empty `output_dir` (its old checkpoints are deleted first).
        dataloader_num_workers: worker processes loading images.
    """

    stage: str
    output_dir: str | Path
    resolution: int
    train_batch_size: int = 1
    max_train_steps: int = 1000
    learning_rate: float = 1e-5
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    ema_decay: float | None = 0.9999
    checkpointing_steps: int = 500
    validation_steps: int | None = None
    validation_prompts: list[str] = field(default_factory=list)
    seed: int = 0
    text_dropout: float = 0.1
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    pyramid_noise_discount: float = 0.0
    coarse_noise_min_timestep: int = 0
    timestep_bias_portion: float = 0.0
    timestep_bias_multiplier: float = 1.0
    max_noise_level: int | None = None
    low_res_blur: float | None = None
    lora_rank: int | None = None
    max_sequence_length: int = 77
    embedding_cache_dir: str | Path | None = None
    resume_from_checkpoint: str | Path | None = None
    overwrite_output_dir: bool = False
    dataloader_num_workers: int = 0
    lr_warmup_steps: int = 0
    lr_scheduler: str = "constant"
    adam_weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: expected one of {STAGES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: expected one of {MIXED_PRECISION}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler={self.lr_scheduler!r}: expected one of {LR_SCHEDULERS}")
        positive = ["resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                    "checkpointing_steps", "max_sequence_length"]  # fmt: skip
        for name in positive + ["validation_steps", "lora_rank", "max_noise_level"]:
            value = getattr(self, name)
            if (value is not None or name in positive) and (type(value) is not int or value < 1):
                raise ValueError(
                    f"{name}={value!r}: expected a positive int" + ("" if name in positive else " or None")
                )
        for name in ("dataloader_num_workers", "lr_warmup_steps", "seed", "coarse_noise_min_timestep"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= 0")
        _check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_number("adam_weight_decay", self.adam_weight_decay, low=0.0)
        _check_number("text_dropout", self.text_dropout, low=0.0, high=1.0)
        if self.ema_decay is not None:
            _check_number("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        _check_number("noise_offset", self.noise_offset, low=0.0)
        _check_number("pyramid_noise_discount", self.pyramid_noise_discount, low=0.0, high=1.0, high_open=True)
        if self.coarse_noise_min_timestep and not (self.noise_offset or self.pyramid_noise_discount):
            raise ValueError(
                f"coarse_noise_min_timestep={self.coarse_noise_min_timestep} with no noise_offset or "
                "pyramid_noise_discount: expected one of them > 0 (it says which steps get that noise)"
            )
        _check_number("timestep_bias_portion", self.timestep_bias_portion, low=0.0, high=1.0)
        _check_number("timestep_bias_multiplier", self.timestep_bias_multiplier, low=0.0, low_open=True)
        if self.snr_gamma is not None:
            _check_number("snr_gamma", self.snr_gamma, low=0.0, low_open=True)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        for name in ("max_noise_level", "low_res_blur"):
            if self.stage != "II" and getattr(self, name) is not None:
                raise ValueError(f"{name}={getattr(self, name)}: only stage II augments a low-res input")
        if self.low_res_blur is not None:
            _check_number("low_res_blur", self.low_res_blur, low=0.0, high=MAX_BLUR, low_open=True)
        if self.stage == "II" and self.resolution % SUPER_RESOLUTION_SCALE:
            raise ValueError(f"resolution={self.resolution}: stage II needs a multiple of {SUPER_RESOLUTION_SCALE}")
        if not isinstance(self.validation_prompts, list) or not all(
            isinstance(p, str) for p in self.validation_prompts
        ):
            raise ValueError(f"validation_prompts={self.validation_prompts!r}: expected a list of strings")
        if self.validation_steps is not None and not self.validation_prompts:
            raise ValueError(f"validation_steps={self.validation_steps} but validation_prompts is empty")
        if self.lora_rank is not None and importlib.util.find_spec("peft") is None:
            raise ValueError(f"lora_rank={self.lora_rank}: LoRA training needs the peft package (pip install "
                             "'if-diffusers[lora]'), which is not installed")  # fmt: skip
        self.output_dir = Path(self.output_dir)


def _check_number(name: str, value, low: float, high: float = math.inf, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r}: expected a number in {bounds}")


# --- one step's loss -------------------------------------------------------------------------------------------


def sample_generators(seed: int, positions: range | list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, a pure function of `seed` and the sample's position in the data stream: a sample's
    draws do not depend on the batch, the process or the number of processes it is trained on. (On a GPU that is a
    few small kernels per sample and step, against a UNet's forward and backward.)"""
    return [torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, position]).generate_state(1)[0]))
            for position in positions]  # fmt: skip


def drop_text(embeddings: torch.Tensor, empty: torch.Tensor, rate: float, generator: Generators) -> torch.Tensor:
    """`(B, L, D)` caption embeddings with each row replaced by `empty` `(L, D)` (T5 of "") with probability `rate`,
    drawn from `generator` (or row i from generator i; one uniform per row, always drawn so that later draws do not
    depend on `rate`)."""
    drop = uniform(embeddings.shape[0], generator, embeddings.device) < rate
    return torch.where(drop[:, None, None], empty.to(embeddings), embeddings)


def diffusion_loss(
    unet: torch.nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: Generators,
    schedule: DiffusionSchedule,
    augmentation_alphas_cumprod: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    timestep_bias: tuple[float, float] = (0.0, 1.0),
    max_noise_level: int | None = None,
    max_blur: float | None = None,
    pyramid_noise_discount: float = 0.0,
    coarse_noise_min_timestep: int = 0,
) -> torch.Tensor:
    """`(B,)` hybrid loss of `unet` on `images` `(B, 3, H, W)` in `[-1, 1]` with T5 `text_embeddings` `(B, L, D)`,
    drawing timesteps, noise and (super-resolution, when `augmentation_alphas_cumprod` is given) the low-res
    augmentation level and noise from `generator`, in that order (a list of generators: sample i's from generator i,
    so that a sample's draws do not depend on the batch it is in). The loss is computed in float32. With
    `snr_gamma`, the epsilon (or v) term is weighted by `min_snr_weights` (the variance term is left as it is). With
    `noise_offset` > 0, the noise gets a constant per sample and channel, `noise_offset * N(0, 1)` (drawn after the
    noise; see `TrainingConfig.noise_offset`); with `pyramid_noise_discount` > 0 it becomes `losses.pyramid_noise`
    (drawn after the offset, which its rescaling scales down with the rest); both are drawn for every sample and
    kept only for those at `coarse_noise_min_timestep` or noisier. `timestep_bias` is `(bias_portion,
    bias_multiplier)` of `sample_timesteps` (default: uniform). `max_noise_level` caps the augmentation level and
    `max_blur` blurs the low-res input (`super_resolution_inputs`; default: the whole schedule, no blur)."""
    timesteps = sample_timesteps(images.shape[0], generator, schedule.num_timesteps, *timestep_bias)
    timesteps = timesteps.to(images.device)
    noise = plain_noise = randn_tensor(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    if noise_offset:
        offset = randn_tensor((*images.shape[:2], 1, 1), generator=generator, device=images.device, dtype=images.dtype)
        noise = noise + noise_offset * offset
    if pyramid_noise_discount:
        noise = pyramid_noise(noise, pyramid_noise_discount, generator)
    if coarse_noise_min_timestep:
        noise = torch.where((timesteps >= coarse_noise_min_timestep).view(-1, 1, 1, 1), noise, plain_noise)
    model_input, class_labels = q_sample(images, noise, timesteps, schedule), None
    if augmentation_alphas_cumprod is not None:
        low_res, class_labels = super_resolution_inputs(images, augmentation_alphas_cumprod, generator,
                                                        max_noise_level=max_noise_level, max_blur=max_blur)  # fmt: skip
        model_input = torch.cat([model_input, low_res], dim=1)  # noisy (B, 3, H, W) + low-res (B, 3, H, W) -> 6
    output = unet(model_input, timesteps, encoder_hidden_states=text_embeddings, class_labels=class_labels).sample
    loss, terms = hybrid_loss(output.float(), images, noise, timesteps, schedule)
    if snr_gamma is None:
        return loss
    return terms["mse"] * min_snr_weights(timesteps, schedule, snr_gamma) + terms["vb"]


@dataclass
class TrainingProgress:
    """Saved in every checkpoint: the optimizer steps done, the data stream's position (the samples all processes
    have taken) and the number of processes that trained. `None`: from a checkpoint written before they were saved
    (the run derives them from the step count and its own processes)."""

    step: int = 0
    samples: int | None = 0
    processes: int | None = 1

    def state_dict(self) -> dict[str, int | None]:
        return {"step": self.step, "samples": self.samples, "processes": self.processes}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self.step, self.samples, self.processes = state["step"], state.get("samples"), state.get("processes")


# --- checks before anything runs -------------------------------------------------------------------------------


def find_checkpoint(config: TrainingConfig) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names (None: start fresh, also for "latest" when there is none yet); a
    missing one is a ValueError."""
    if config.resume_from_checkpoint is None:
        return None
    if str(config.resume_from_checkpoint) != "latest":
        path = Path(config.resume_from_checkpoint)
        if not (path / "custom_checkpoint_0.pkl").is_file():
            raise ValueError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint folder of train()")
        return path
    found = sorted((int(m.group(1)), p) for p in (config.output_dir / "checkpoints").glob("checkpoint-*")
                   if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))  # fmt: skip
    return found[-1][1] if found else None


def augmentation_schedule(unet) -> torch.Tensor:
    """`(N,)` alphas_cumprod of a super-resolution UNet's low-res noise augmentation: its own, or IF's default."""
    alphas = getattr(unet, "noise_augmentation_alphas_cumprod", None)
    return alphas if alphas is not None else noising_scheduler().alphas_cumprod


def accelerate_version() -> Version:
    return Version(importlib.metadata.version("accelerate"))


def _check_inputs(config: TrainingConfig, unet, dataset, checkpoint: Path | None) -> None:
    """The UNet suits the stage and resolution, the dataset is non-empty, the output folder usable and a checkpoint
    loadable by the installed accelerate."""
    if checkpoint is not None and (installed := accelerate_version()) < RESUME_ACCELERATE:
        raise ValueError(
            f"resume_from_checkpoint={str(config.resume_from_checkpoint)!r}: resuming needs accelerate >= "
            f"{RESUME_ACCELERATE}; accelerate {installed} cannot load its own checkpoints' random states "
            f"under torch {torch.__version__} (KeyError: 'step'): pip install -U accelerate"
        )
    expected = 6 if config.stage == "II" else 3
    if unet.config.in_channels != expected or unet.config.out_channels != 6:
        raise ValueError(
            f"unet takes {unet.config.in_channels} and gives {unet.config.out_channels} channels; stage "
            f"{config.stage} expects {expected} in (noisy image{' + low-res image' if expected == 6 else ''}) and "
            "6 out (epsilon + learned variance)"
        )
    multiple = size_multiple(unet) * (SUPER_RESOLUTION_SCALE if config.stage == "II" else 1)
    if config.resolution % multiple:
        raise ValueError(f"resolution={config.resolution}: this unet needs a multiple of {multiple}")
    dtypes = {p.dtype for p in unet.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"unet has dtypes {dtypes}; expected float32 weights (use mixed_precision for fp16/bf16)")
    levels = len(augmentation_schedule(unet)) if config.max_noise_level is not None else None
    if levels is not None and config.max_noise_level > levels:
        raise ValueError(
            f"max_noise_level={config.max_noise_level}: the unet's augmentation schedule has only {levels} levels"
        )
    if len(dataset) < 1:
        raise ValueError("dataset is empty; expected at least one (image, caption)")
    to_training_tensor(image_and_caption(dataset[0], 0)[0], config.resolution, 0)
    if checkpoint is None:
        check_writable_folder(config.output_dir, config.overwrite_output_dir, "output_dir")


# --- the run ---------------------------------------------------------------------------------------------------


def train(
    config: TrainingConfig,
    unet: torch.nn.Module,
    tokenizer,
    text_encoder,
    dataset: CaptionedDataset,
    scheduler: DDPMScheduler | None = None,
    output_pipeline: DiffusionPipeline | None = None,
) -> Path:
    """Train `unet` (an `IFUNet2DConditionModel` for stage I, `IFSuperResUNet2DConditionModel` for II; float32,
    trained in place) on `dataset` as `config` says, with T5 (`tokenizer`, `text_encoder`) frozen.

    `scheduler`: the training schedule and the saved pipeline's scheduler (default `denoising_scheduler(stage)`).
    Its `prediction_type` is what the UNet learns to predict: IF's "epsilon", or "v_prediction"
    (`denoising_scheduler(stage, "v_prediction")`); fine-tuning a saved pipeline keeps the one its scheduler names.
    Every input is checked before any model runs. At the end the UNet holds the EMA weights when EMA is on, and is
    in eval mode. Returns the folder written: `output_dir/pipeline` (`IFPipeline` / `IFSuperResolutionPipeline`
    `.from_pretrained` loads it), or `output_dir/lora` (for `load_lora_weights`) with `lora_rank`.

    `output_pipeline`: instead, the pipeline saved as `output_dir/pipeline`, one that holds `unet` among its
    components (the `IFCascadePipeline` the UNet was taken from, say: the cascade with the trained stage). With
    `lora_rank` it is saved too, beside `output_dir/lora`, with the adapter merged into the UNet's weights (the UNet
    keeps them merged and loses the adapter).
    """
    processes = join_processes()
    checkpoint = find_checkpoint(config)
    if checkpoint is None and config.resume_from_checkpoint is not None:
        logger.warning(f"resume_from_checkpoint='latest': no checkpoint in {config.output_dir}; starting fresh")
    _check_inputs(config, unet, dataset, checkpoint)
    processes.wait_for_everyone()  # every process has checked the output folder before the main one writes to it
    if output_pipeline is not None and not any(c is unet for c in output_pipeline.components.values()):
        raise ValueError(
            f"output_pipeline ({type(output_pipeline).__name__}) does not hold unet among its components; expected "
            "the pipeline the trained UNet belongs to"
        )
    scheduler = scheduler if scheduler is not None else denoising_scheduler(config.stage)
    schedule = diffusion_schedule(scheduler)  # rejects a schedule that is not IF's objective (or its v form)
    if config.coarse_noise_min_timestep >= schedule.num_timesteps:
        raise ValueError(
            f"coarse_noise_min_timestep={config.coarse_noise_min_timestep}: expected a step of the scheduler's "
            f"{schedule.num_timesteps} (0 to {schedule.num_timesteps - 1})"
        )
    return _Run(config, unet, tokenizer, text_encoder, dataset, scheduler, schedule, checkpoint, output_pipeline).run()


def join_processes() -> PartialState:
    """accelerate's process state (see `if_diffusers.processes`), over gloo on a machine without an accelerator."""
    return process_state(cpu=_no_accelerator())


def _no_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


class _Run:
    """One call of `train`: the prepared objects, the loop, checkpoints, validation and the result."""

    def __init__(self, config, unet, tokenizer, text_encoder, dataset, scheduler, schedule, checkpoint,
                 output_pipeline=None):  # fmt: skip
        self.config, self.dataset, self.scheduler = config, dataset, scheduler
        self.output_pipeline = output_pipeline  # saved at the end instead of the stage's pipeline (`train`)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.accelerator = accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=_no_accelerator(),
        )
        if checkpoint is None and accelerator.is_main_process:  # a new run: no stale checkpoint can be "latest"
            shutil.rmtree(config.output_dir / "checkpoints", ignore_errors=True)
        with accelerator.main_process_first():  # the main process fills the cache, the others read it
            texts = [*dataset_captions(dataset), "", *config.validation_prompts]
            self.embeddings = embed_captions(texts, tokenizer, text_encoder, config.max_sequence_length,
                                             config.embedding_cache_dir)  # fmt: skip
        self.device = device = accelerator.device
        self.schedule = schedule.to(device)
        self.augmentation = None
        if config.stage == "II":
            self.augmentation = augmentation_schedule(unet).to(device)
        self.unet = unet.to(device)
        self.lora_config = self._add_lora() if config.lora_rank is not None else None
        self.params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
        # accelerate steps a prepared LR scheduler once per process per step: warm-up and decay count those calls
        lr_scheduler = get_scheduler(
            config.lr_scheduler if config.lr_scheduler != "constant" else "constant_with_warmup", optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.max_train_steps * accelerator.num_processes,
        )  # fmt: skip
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = EMAModel(self.params, decay=config.ema_decay)
            self.ema.to(device)
            accelerator.register_for_checkpointing(self.ema)
        self.progress = TrainingProgress(processes=accelerator.num_processes)
        accelerator.register_for_checkpointing(self.progress)
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            # checkpoints fall between optimizer steps; the micro-step count it restores (from a process's own RNG
            # file, which a process the saving run lacked does not have) would be counted in the saved run's
            # accumulation
            accelerator.step = 0
            if self.progress.samples is None:  # saved before the stream position was: as this run would have it
                self.progress.samples = self.progress.step * config.gradient_accumulation_steps * self._stride
            self._follow_this_runs_schedule(saved_processes=self.progress.processes or accelerator.num_processes)
            self.progress.processes = accelerator.num_processes
            if self.ema is not None:
                self.ema.to(device)  # loaded on the CPU
            logger.info(f"resumed from {checkpoint} at step {self.progress.step}")

    @property
    def _stride(self) -> int:
        """Stream positions per micro-step: every process's batch."""
        return self.config.train_batch_size * self.accelerator.num_processes

    def _follow_this_runs_schedule(self, saved_processes: int) -> None:
        """After a resume: the rate of the next step from this run's `learning_rate` and schedule (which may end at a
        later `max_train_steps` than the run that saved the checkpoint), not the saved run's last rate, and counted
        in this run's processes (accelerate steps the schedule once per process per step, and not for a step that
        fp16 skipped: a checkpoint of 2 processes holds twice the count of 1). Unchanged settings give the saved
        rate bitwise (the scheduler's own expression)."""
        scheduler = self.lr_scheduler.scheduler
        scheduler.last_epoch = scheduler.last_epoch * self.accelerator.num_processes // saved_processes
        scheduler.base_lrs = [self.config.learning_rate] * len(scheduler.base_lrs)
        rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates

    def _add_lora(self):
        from peft import LoraConfig

        rank = self.config.lora_rank
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES)
        self.unet.requires_grad_(False)
        # the adapter's random initial weights from `seed`, not from whatever the global generator holds
        # (PEFT initialises them on the CPU, then moves them to the UNet's device)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.config.seed)
            self.unet.add_adapter(config)  # only the adapter's weights require gradients
        return config

    def _batches(self) -> torch.utils.data.DataLoader:
        config, accelerator = self.config, self.accelerator
        sampler = ResumableBatches(len(self.dataset), config.train_batch_size, config.seed, start=self.progress.samples,
                                   rank=accelerator.process_index, processes=accelerator.num_processes)  # fmt: skip
        return torch.utils.data.DataLoader(IndexedItems(self.dataset), batch_sampler=sampler,
                                           collate_fn=CollateImages(config.resolution),
                                           num_workers=config.dataloader_num_workers)  # fmt: skip

    def run(self) -> Path:
        config, accelerator = self.config, self.accelerator
        bar = tqdm(total=config.max_train_steps, initial=self.progress.step, desc="training",
                   disable=not accelerator.is_main_process)  # fmt: skip
        losses = []
        self.model.train()
        batches = iter(self._batches())
        while self.progress.step < config.max_train_steps:
            images, captions = next(batches)
            first = self.progress.samples + accelerator.process_index * config.train_batch_size
            losses.append(self._micro_step(images.to(self.device), captions, range(first, first + len(captions))))
            self.progress.samples += self._stride
            if not accelerator.sync_gradients:
                continue
            if self.ema is not None:
                self.ema.step(self.params)
            self.progress.step += 1
            bar.update()
            loss = accelerator.reduce(torch.stack(losses).mean(), "mean")  # every process's batch
            bar.set_postfix(loss=f"{loss.item():.4g}", lr=self.lr_scheduler.get_last_lr()[0])
            losses = []
            if self.progress.step % config.checkpointing_steps == 0:
                self._checkpoint()
            if config.validation_steps is not None and self.progress.step % config.validation_steps == 0:
                self._validate()
        bar.close()
        return self._save_result()

    def _micro_step(self, images: torch.Tensor, captions: list[str], positions: range) -> torch.Tensor:
        """Forward, backward and (at the last micro-step of a step) the optimizer step on the samples at `positions`
        of the data stream; returns the detached loss."""
        config = self.config
        generator = sample_generators(config.seed, positions, self.device)
        text = torch.stack([self.embeddings[c] for c in captions]).to(self.device)
        text = drop_text(text, self.embeddings[""], config.text_dropout, generator)
        with self.accelerator.accumulate(self.model):
            loss = diffusion_loss(self.model, images, text, generator, self.schedule, self.augmentation,
                                  config.snr_gamma, config.noise_offset,
                                  (config.timestep_bias_portion, config.timestep_bias_multiplier),
                                  config.max_noise_level, config.low_res_blur,
                                  config.pyramid_noise_discount, config.coarse_noise_min_timestep).mean()  # fmt: skip
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and config.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return loss.detach()

    def _checkpoint(self) -> None:
        """`accelerator.save_state` into `checkpoints/checkpoint-N`, atomically: written beside, then renamed."""
        accelerator = self.accelerator
        folder = self.config.output_dir / "checkpoints" / f"checkpoint-{self.progress.step}"
        partial = folder.with_name(f".{folder.name}.partial")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _averaged(self) -> Iterator[None]:
        """The UNet holds the EMA weights inside (when EMA is on), its own weights again after."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def _pipeline(self, with_text: bool):
        """The stage's pipeline around the (unwrapped) UNet; without T5 for validation, which passes embeddings."""
        from ..pipelines import IFPipeline, IFSuperResolutionPipeline

        text = (self.tokenizer, self.text_encoder) if with_text else (None, None)
        components = dict(unet=self.accelerator.unwrap_model(self.model), scheduler=self.scheduler,
                          safety_checker=None, feature_extractor=None, watermarker=None,
                          requires_safety_checker=False, tokenizer=text[0], text_encoder=text[1])  # fmt: skip
        if self.config.stage == "I":
            return IFPipeline(**components)
        return IFSuperResolutionPipeline(image_noising_scheduler=noising_scheduler(), **components)

    def _validate(self) -> None:
        """Sample `validation_prompts` (stage II: upscaling the first training images, downsampled) with the EMA
        weights, and save them side by side as `validation/step-N.png` (main process; the others wait)."""
        accelerator, config = self.accelerator, self.config
        if accelerator.is_main_process:
            pipeline = self._pipeline(with_text=False)
            pipeline.set_progress_bar_config(disable=True)
            count = len(config.validation_prompts)
            prompts = torch.stack([self.embeddings[p] for p in config.validation_prompts]).to(self.device)
            kwargs = dict(prompt_embeds=prompts, negative_prompt_embeds=self.embeddings[""].expand_as(prompts).to(
                self.device), timesteps=VALIDATION_TIMESTEPS[config.stage],
                generator=torch.Generator(self.device).manual_seed(config.seed))  # fmt: skip
            if config.stage == "II":
                targets = [image_and_caption(self.dataset[i % len(self.dataset)], i)[0] for i in range(count)]
                targets = torch.stack([to_training_tensor(t, config.resolution, i) for i, t in enumerate(targets)])
                kwargs["image"] = downsample(targets, SUPER_RESOLUTION_SCALE).to(self.device)
            self.model.eval()
            with self._averaged(), torch.no_grad():
                images = pipeline(**kwargs).images
            self.model.train()
            folder = config.output_dir / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            image_grid(images, columns=len(images)).save(folder / f"step-{self.progress.step}.png")
        accelerator.wait_for_everyone()

    def _save_result(self) -> Path:
        """The EMA weights into the UNet, then the pipeline folder (or the LoRA file), atomically."""
        accelerator, config = self.accelerator, self.config
        accelerator.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.params)
        unet = accelerator.unwrap_model(self.model).eval()
        folder = config.output_dir / ("lora" if self.lora_config is not None else "pipeline")
        if accelerator.is_main_process:
            pipeline = self._pipeline(with_text=True)
            if self.lora_config is not None:
                from peft.utils import get_peft_model_state_dict

                with atomic_folder(folder, overwrite=True) as staging:
                    type(pipeline).save_lora_weights(staging, unet_lora_layers=get_peft_model_state_dict(unet),
                                                     unet_lora_adapter_metadata=self.lora_config.to_dict())  # fmt: skip
                if self.output_pipeline is not None:
                    unet.fuse_lora()
                    unet.unload_lora()  # plain layers holding the merged weights, as the saved UNet class has
            if self.lora_config is None or self.output_pipeline is not None:
                (self.output_pipeline or pipeline).save_pretrained(config.output_dir / "pipeline")
        accelerator.wait_for_everyone()
        # no `accelerator.end_training()`: it would destroy the process group of the launch, which a script training
        # more than once (stage I, then stage II) still needs; there are no trackers to stop
        return folder
