"""`if_diffusers.training.train` on tiny components: the loss falls, checkpoints resume exactly (after a stop or a
crash), LoRA adapters round-trip through `load_lora_weights`, text dropout and the embedding cache do what they say,
bad inputs fail before any step, and the saved folder loads and runs (also through the command line)."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from if_diffusers import IFPipeline
from if_diffusers.scheduling import denoising_scheduler, noising_scheduler
from if_diffusers.synthetic.shapes import ShapesDataset
from if_diffusers.training import CaptionedImageFolder, TrainingConfig, diffusion_loss, embed_captions, train
from if_diffusers.training.command_line import main as train_main
from if_diffusers.training.losses import (
    diffusion_schedule,
    hybrid_loss,
    min_snr_weights,
    pyramid_noise,
    q_sample,
    sample_timesteps,
    super_resolution_inputs,
)
from if_diffusers.training.trainer import sample_generators

CAPTIONS = ["a red circle", "a green square", "a yellow triangle"]
RESOLUTION = {"I": 16, "II": 32}


class Pairs:
    """`(PIL image, caption)` items: random images (seeded) with short captions the tiny tokenizer knows."""

    def __init__(self, count: int, size: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.items = [(PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                       CAPTIONS[i % len(CAPTIONS)]) for i in range(count)]  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _config(tmp_path, name: str = "run", **overrides) -> TrainingConfig:
    settings = dict(stage="I", output_dir=tmp_path / name, resolution=16, train_batch_size=2, max_train_steps=4,
                    learning_rate=1e-3, gradient_accumulation_steps=2, ema_decay=0.9, checkpointing_steps=2,
                    text_dropout=0.1, seed=3)  # fmt: skip
    return TrainingConfig(**{**settings, **overrides})


def _learning_rate(checkpoint) -> float:
    """The learning rate a checkpoint's LR scheduler had set for the next step."""
    return torch.load(checkpoint / "scheduler.bin", weights_only=False)["_last_lr"][0]


def _count_calls(module: torch.nn.Module, fail_at: int | None = None) -> list[int]:
    """A forward hook counting `module`'s calls (into the returned list); with `fail_at`, that call raises."""
    calls = []

    def hook(*_):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("simulated crash")

    module.register_forward_pre_hook(hook)
    return calls


def _weights(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


def _ema(folder) -> list[torch.Tensor]:
    return torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"]


def _assert_same_state(folder, reference) -> None:
    """UNet weights and EMA weights of two checkpoints are bitwise equal."""
    weights, expected = _weights(folder), _weights(reference)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    ema, expected_ema = _ema(folder), _ema(reference)
    assert len(ema) == len(expected_ema) == len(list(weights))
    assert all(torch.equal(a, b) for a, b in zip(ema, expected_ema))


# --- the loss falls ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, prediction_type", [("I", "epsilon"), ("II", "epsilon"), ("II", "v_prediction")])
def test_loss_decreases_on_a_fixed_batch(tiny_text, tmp_path, stage, prediction_type):
    """Training on two fixed examples lowers the hybrid loss measured on fixed draws (timesteps, noise, and for
    stage II the augmentation) before and after. Stage II reads `ShapesDataset` `Example` items. The scheduler's
    prediction type is what is learnt, and the saved pipeline's scheduler keeps it."""
    tokenizer, text_encoder = tiny_text
    unet = tiny_unet(stage)
    size = RESOLUTION[stage]
    dataset = Pairs(2, size) if stage == "I" else ShapesDataset(2, seed=0, size=size)
    items = [dataset[i] if stage == "I" else (dataset[i].image, dataset[i].caption) for i in range(2)]
    images = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for im, _ in items])  # fmt: skip
    table = embed_captions([c for _, c in items], tokenizer, text_encoder)
    text = torch.stack([table[c] for _, c in items])
    scheduler = denoising_scheduler(stage, prediction_type)
    schedule = diffusion_schedule(scheduler)
    alphas = noising_scheduler().alphas_cumprod if stage == "II" else None

    def measured() -> float:
        with torch.no_grad():
            losses = [diffusion_loss(unet, images, text, torch.Generator().manual_seed(s), schedule, alphas).mean()
                      for s in range(8)]  # fmt: skip
        return torch.stack(losses).mean().item()

    before = measured()
    config = _config(tmp_path, stage=stage, resolution=size, max_train_steps=20, gradient_accumulation_steps=1,
                     ema_decay=None, text_dropout=0.0, checkpointing_steps=100)  # fmt: skip
    folder = train(config, unet, tokenizer, text_encoder, dataset, scheduler)
    after = measured()
    assert after < 0.5 * before, (before, after)  # measured: 1.88 -> 0.54 (I), 1.83 -> 0.37 (II), 1.39 -> 0.48 (II, v)
    assert DDPMScheduler.from_pretrained(folder / "scheduler").config.prediction_type == prediction_type


def test_snr_gamma_and_noise_offset_change_only_their_parts_of_the_loss(tiny_text):
    """`diffusion_loss(snr_gamma=5)` is the hybrid loss's epsilon term times `min_snr_weights` plus its variance term
    unchanged; `noise_offset=0.1` trains on noise plus `0.1 * N(0, 1)` per sample and channel, drawn after the
    noise; `pyramid_noise_discount` adds the coarser levels after that, and `coarse_noise_min_timestep` keeps both
    only for the samples at that step or noisier; `timestep_bias` draws its steps with `sample_timesteps`' bias. Each
    is checked against the loss recomputed here step by step from the same draws."""
    tokenizer, text_encoder = tiny_text
    unet = tiny_unet("I").eval()
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    text = embed_captions(["a red circle"], tokenizer, text_encoder)["a red circle"].expand(6, -1, -1)
    schedule = diffusion_schedule(denoising_scheduler("I"))

    def recomputed(offset: float, bias: tuple[float, float] = (0.0, 1.0), pyramid: float = 0.0, gate: int = 0):
        generator = torch.Generator().manual_seed(3)
        steps = sample_timesteps(6, generator, 1000, *bias)
        noise = plain = torch.randn(images.shape, generator=generator)
        if offset:
            noise = noise + offset * torch.randn(6, 3, 1, 1, generator=generator)
        if pyramid:  # levels 8, 4, 2, 1 of the 16x16 images, upsampled by repetition, unit variance
            levels = [torch.randn(6, 3, 16 >> k, 16 >> k, generator=generator) for k in range(1, 5)]
            coarse = sum(pyramid**k * level.repeat_interleave(1 << k, 2).repeat_interleave(1 << k, 3)
                         for k, level in enumerate(levels, start=1))  # fmt: skip
            noise = (noise + coarse) / (1 + sum(pyramid ** (2 * k) for k in range(1, 5))) ** 0.5
        noise = torch.stack([n if t >= gate else p for n, p, t in zip(noise, plain, steps.tolist())])
        output = unet(q_sample(images, noise, steps, schedule), steps, encoder_hidden_states=text).sample
        return steps, hybrid_loss(output, images, noise, steps, schedule)[1]

    def loss(**options):
        return diffusion_loss(unet, images, text, torch.Generator().manual_seed(3), schedule, **options)

    with torch.no_grad():
        steps, terms = recomputed(0.0)
        _, offset_terms = recomputed(0.1)
        biased_steps, biased_terms = recomputed(0.0, (0.5, 50.0))
        _, pyramid_terms = recomputed(0.1, pyramid=0.8)
        gate = int(steps.median())  # some samples above it, some below
        _, gated_terms = recomputed(0.1, pyramid=0.8, gate=gate)
        torch.testing.assert_close(loss(), terms["mse"] + terms["vb"])
        weights = min_snr_weights(steps, schedule, 5.0)
        torch.testing.assert_close(loss(snr_gamma=5.0), terms["mse"] * weights + terms["vb"])
        torch.testing.assert_close(loss(noise_offset=0.1), offset_terms["mse"] + offset_terms["vb"])
        torch.testing.assert_close(loss(timestep_bias=(0.5, 50.0)), biased_terms["mse"] + biased_terms["vb"])
        torch.testing.assert_close(loss(noise_offset=0.1, pyramid_noise_discount=0.8),
                                   pyramid_terms["mse"] + pyramid_terms["vb"])  # fmt: skip
        torch.testing.assert_close(loss(noise_offset=0.1, pyramid_noise_discount=0.8, coarse_noise_min_timestep=gate),
                                   gated_terms["mse"] + gated_terms["vb"])  # fmt: skip
    coarse = steps >= gate
    assert 0 < coarse.sum() < 6, (steps, gate)
    assert torch.equal(gated_terms["mse"][coarse], pyramid_terms["mse"][coarse])
    assert torch.equal(gated_terms["mse"][~coarse], terms["mse"][~coarse])
    assert (biased_steps >= 500).sum() >= 5, biased_steps  # 50:1 odds for the noisier half: all but rarely one
    assert (weights < 1).any(), steps  # the draw includes nearly clean steps, so the weighted loss differs there
    assert not torch.allclose(offset_terms["mse"], terms["mse"])


def test_pyramid_noise_keeps_unit_variance_and_hides_coarse_layouts():
    """Each pixel of pyramid noise has unit variance (measured over many draws), as IF's noising assumes; the
    difference between the means of an image's two halves, which i.i.d. noise all but averages away, varies 27 times
    more at discount 0.8, which is what hides a two-tone background's split. Discount 0 is the noise itself."""
    noise = torch.randn(4096, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pyramid = pyramid_noise(noise, 0.8, torch.Generator().manual_seed(1))
    assert abs(pyramid.var().item() - 1.0) < 0.02 and abs(pyramid.mean().item()) < 0.02
    halves = {name: (sample[..., :16].mean((-1, -2)) - sample[..., 16:].mean((-1, -2))).var().item()
              for name, sample in (("iid", noise), ("pyramid", pyramid))}  # fmt: skip
    assert halves["pyramid"] > 20 * halves["iid"], halves  # measured 0.105 against 0.0039
    assert torch.equal(pyramid_noise(noise[:2], 0.0, torch.Generator().manual_seed(1)), noise[:2])
    with pytest.raises(ValueError, match="^discount is 1.0; expected a number in"):
        pyramid_noise(noise[:1], 1.0, torch.Generator())


def test_max_noise_level_caps_the_augmentation_the_unet_sees(tiny_text):
    """Stage II with `max_noise_level=300`: the UNet's `class_labels` (augmentation levels) stay below 300 and equal
    `super_resolution_inputs`' capped draws from the same generator state; without the cap they range the whole
    schedule."""
    tokenizer, text_encoder = tiny_text
    unet = tiny_unet("II").eval()
    seen = []
    unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    text = embed_captions(["a red circle"], tokenizer, text_encoder)["a red circle"].expand(64, -1, -1)
    schedule, alphas = diffusion_schedule(denoising_scheduler("II")), noising_scheduler().alphas_cumprod
    with torch.no_grad():
        for cap in (300, None):
            diffusion_loss(unet, images, text, torch.Generator().manual_seed(3), schedule, alphas, max_noise_level=cap)
    replay = torch.Generator().manual_seed(3)
    sample_timesteps(64, replay, 1000), torch.randn(images.shape, generator=replay)  # the steps, the noise
    assert torch.equal(seen[0], super_resolution_inputs(images, alphas, replay, max_noise_level=300)[1])
    assert seen[0].max() < 300 and seen[1].max() >= 300, (seen[0].max(), seen[1].max())


def test_low_res_blur_reaches_the_unets_low_res_channels():
    """`diffusion_loss(max_blur=...)` (`TrainingConfig.low_res_blur`) feeds the UNet the blurred low-res input that
    `super_resolution_inputs` draws from the same generator state."""
    unet = tiny_unet("II").eval()
    seen = []
    unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(args[0][:, 3:]), with_kwargs=True)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    text = torch.zeros(4, 77, unet.config.encoder_hid_dim)
    schedule, alphas = diffusion_schedule(denoising_scheduler("II")), noising_scheduler().alphas_cumprod
    with torch.no_grad():
        diffusion_loss(unet, images, text, torch.Generator().manual_seed(3), schedule, alphas, max_blur=1.0)
    replay = torch.Generator().manual_seed(3)
    sample_timesteps(4, replay, 1000), torch.randn(images.shape, generator=replay)  # the steps, the noise
    torch.testing.assert_close(seen[0], super_resolution_inputs(images, alphas, replay, max_blur=1.0)[0])


# --- exact resume -----------------------------------------------------------------------------------------------

# The straight run's LR schedule. Its first two steps' rates do not depend on max_train_steps (warm-up from 0, then
# the top of the cosine), and a resumed run takes its rates from its own schedule (not the 2-step run's last rate,
# 0), so a run stopped at step 2 and resumed to 4 is one uninterrupted run.
DECAYING = {"lr_scheduler": "cosine", "lr_warmup_steps": 1}


@pytest.fixture(scope="module")
def straight_run(tiny_text, tmp_path_factory):
    """Four steps (two micro-steps each, three items: epochs wrap mid-step) straight through, with EMA, checkpoints
    every two steps, validation at step 4, one warm-up step and a cosine decay of the learning rate."""
    tokenizer, text_encoder = tiny_text
    root = tmp_path_factory.mktemp("straight")
    config = _config(root, validation_steps=4, validation_prompts=["a red circle", "a green square"], **DECAYING)
    folder = train(config, tiny_unet("I"), tokenizer, text_encoder, Pairs(3))
    return config.output_dir, folder


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_text, tmp_path, straight_run):
    """Two steps, stop, resume to four: UNet and EMA weights at step 4 equal the straight run's bitwise (validation,
    which the straight run did, changes nothing), and so does the saved UNet."""
    tokenizer, text_encoder = tiny_text
    train(_config(tmp_path, max_train_steps=2, **DECAYING), tiny_unet("I"), tokenizer, text_encoder, Pairs(3))
    unet = tiny_unet("I", seed=1)  # the checkpoint replaces every weight
    calls = _count_calls(unet)
    config = _config(tmp_path, resume_from_checkpoint="latest", **DECAYING)
    folder = train(config, unet, tokenizer, text_encoder, Pairs(3))
    assert len(calls) == 4  # steps 3 and 4, two micro-steps each
    straight, straight_folder = straight_run
    _assert_same_state(config.output_dir / "checkpoints/checkpoint-4", straight / "checkpoints/checkpoint-4")
    saved, expected = (safetensors.torch.load_file(f / "unet/diffusion_pytorch_model.safetensors")
                       for f in (folder, straight_folder))  # fmt: skip
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_step(straight_run, tiny_text, tmp_path):
    """With one warm-up step and `lr_scheduler="cosine"` over four steps, the rate after step 2 is
    `1e-3 * (1 + cos(pi / 3)) / 2` and after step 4 zero; "constant" keeps 1e-3 after the warm-up."""
    checkpoints = straight_run[0] / "checkpoints"
    assert _learning_rate(checkpoints / "checkpoint-2") == pytest.approx(1e-3 * (1 + math.cos(math.pi / 3)) / 2)
    assert _learning_rate(checkpoints / "checkpoint-4") == pytest.approx(0.0, abs=1e-12)
    tokenizer, text_encoder = tiny_text
    config = _config(tmp_path, max_train_steps=2, gradient_accumulation_steps=1)  # constant, no warm-up
    train(config, tiny_unet("I"), tokenizer, text_encoder, Pairs(3))
    assert _learning_rate(config.output_dir / "checkpoints/checkpoint-2") == pytest.approx(1e-3)


def test_interrupted_run_resumes_from_its_last_checkpoint(tiny_text, tmp_path, straight_run):
    """A crash during step 3 (after checkpoint-2) leaves checkpoint-2 and no result; resuming "latest" redoes only
    steps 3 and 4 and ends at the straight run's weights."""
    tokenizer, text_encoder = tiny_text
    unet = tiny_unet("I")
    _count_calls(unet, fail_at=6)  # micro-steps 1-4 are steps 1-2; the 6th forward is step 3's second
    config = _config(tmp_path, **DECAYING)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, unet, tokenizer, text_encoder, Pairs(3))
    checkpoints = sorted(p.name for p in (config.output_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2"] and not (config.output_dir / "pipeline").exists()
    unet = tiny_unet("I", seed=1)
    calls = _count_calls(unet)
    train(_config(tmp_path, resume_from_checkpoint="latest", **DECAYING), unet, tokenizer, text_encoder, Pairs(3))
    assert len(calls) == 4
    _assert_same_state(config.output_dir / "checkpoints/checkpoint-4", straight_run[0] / "checkpoints/checkpoint-4")


def test_a_resume_with_another_accumulation_counts_its_own_micro_steps(tiny_text, tmp_path):
    """Three steps of one micro-step each, then resumed with two a step: steps 4 and 5 take two forwards each
    (accelerate restores the saved run's micro-step count, 3, which would end step 4 after one), and the stream
    position carries on (2 samples a micro-step)."""
    tokenizer, text_encoder = tiny_text
    settings = dict(gradient_accumulation_steps=1, ema_decay=None, checkpointing_steps=3)
    train(_config(tmp_path, max_train_steps=3, **settings), tiny_unet("I"), tokenizer, text_encoder, Pairs(3))
    unet = tiny_unet("I")
    calls = _count_calls(unet)
    settings.update(gradient_accumulation_steps=2, checkpointing_steps=5)
    config = _config(tmp_path, max_train_steps=5, resume_from_checkpoint="latest", **settings)
    train(config, unet, tokenizer, text_encoder, Pairs(3))
    assert len(calls) == 4
    progress = torch.load(config.output_dir / "checkpoints/checkpoint-5/custom_checkpoint_0.pkl", weights_only=False)
    assert progress == {"step": 5, "samples": 3 * 2 + 2 * 2 * 2, "processes": 1}


def test_saved_pipeline_loads_and_runs(straight_run):
    """The result loads with `IFPipeline.from_pretrained`, holds the EMA weights and generates; validation wrote
    its image."""
    output_dir, folder = straight_run
    assert folder == output_dir / "pipeline"
    assert PIL.Image.open(output_dir / "validation/step-4.png").size == (2 * 16, 16)
    pipeline = IFPipeline.from_pretrained(folder)
    ema = _ema(output_dir / "checkpoints/checkpoint-4")
    assert all(torch.equal(p, e) for p, e in zip(pipeline.unet.parameters(), ema))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images  # fmt: skip
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


# --- LoRA -------------------------------------------------------------------------------------------------------


def test_lora_round_trip(tiny_text, tmp_path):
    """A LoRA trained for a few steps (with EMA), saved, and loaded with `load_lora_weights` into a fresh pipeline
    gives exactly the images of the adapted UNet in memory, and other images than the base UNet."""
    tokenizer, text_encoder = tiny_text
    unet = tiny_unet("I")
    base = tiny_unet("I")
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), base.parameters()))
    folder = train(_config(tmp_path, lora_rank=4, max_train_steps=3), unet, tokenizer, text_encoder, Pairs(3))
    assert (folder / "pytorch_lora_weights.safetensors").is_file()

    def generate(model) -> torch.Tensor:
        pipeline = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=model,
                              scheduler=denoising_scheduler("I"), safety_checker=None, feature_extractor=None,
                              watermarker=None, requires_safety_checker=False)  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        return pipeline, pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                  output_type="pt").images  # fmt: skip

    _, adapted = generate(unet)
    pipeline, plain = generate(base)
    pipeline.load_lora_weights(folder)
    loaded = pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images  # fmt: skip
    assert torch.equal(loaded, adapted)
    assert (plain - adapted).abs().max() > 1e-3  # measured: 0.017


# --- text dropout and the embedding cache ------------------------------------------------------------------------


def test_text_dropout_feeds_empty_embeddings_at_the_rate(tiny_text, tmp_path):
    """With `text_dropout=0.25` the UNet receives T5("") for the rows the seeded draws pick (the first draw of each
    sample's generator, from its position in the data stream) and the caption's own embedding for the others; about
    a quarter of 48 rows."""
    tokenizer, text_encoder = tiny_text
    unet = tiny_unet("I")
    seen = []
    unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()),
                                   with_kwargs=True)  # fmt: skip
    config = _config(tmp_path, train_batch_size=4, max_train_steps=12, gradient_accumulation_steps=1,
                     text_dropout=0.25, ema_decay=None, checkpointing_steps=100)  # fmt: skip
    train(config, unet, tokenizer, text_encoder, Pairs(3))
    table = embed_captions(["", *CAPTIONS], tokenizer, text_encoder)
    dropped = 0
    for micro_step, rows in enumerate(seen):
        positions = range(4 * micro_step, 4 * micro_step + 4)
        expected = [torch.rand(1, generator=g).item() < 0.25 for g in sample_generators(config.seed, positions, "cpu")]
        for row, drop in zip(rows, expected):
            is_empty = torch.equal(row, table[""])
            assert is_empty == drop and (drop or any(torch.equal(row, table[c]) for c in CAPTIONS))
            dropped += drop
    assert len(seen) == 12 and 4 <= dropped <= 20, dropped


def test_embedding_cache_is_written_and_reused(tiny_text, tmp_path):
    """A first run writes one cache file per distinct text (captions, "", validation prompts); a second run reads
    them and never calls T5. Another token count is another key."""
    tokenizer, text_encoder = tiny_text
    cache = tmp_path / "cache"
    calls = _count_calls(text_encoder)
    settings = dict(
        max_train_steps=1, gradient_accumulation_steps=1, checkpointing_steps=100, embedding_cache_dir=cache
    )
    train(_config(tmp_path, "first", **settings), tiny_unet("I"), tokenizer, text_encoder, Pairs(3))
    assert len(calls) > 0 and len(list(cache.glob("*.safetensors"))) == len(CAPTIONS) + 1
    first = embed_captions(CAPTIONS, tokenizer, text_encoder, cache_dir=cache)
    calls.clear()
    train(_config(tmp_path, "second", **settings), tiny_unet("I"), tokenizer, text_encoder, Pairs(3))
    assert calls == []
    fresh = embed_captions(CAPTIONS, tokenizer, text_encoder)  # no cache: encoded now
    assert all(torch.equal(first[c], fresh[c]) for c in CAPTIONS)
    calls.clear()
    embed_captions(CAPTIONS, tokenizer, text_encoder, max_sequence_length=16, cache_dir=cache)
    assert len(calls) > 0 and len(list(cache.glob("*.safetensors"))) == 2 * len(CAPTIONS) + 1


# --- bad inputs ---------------------------------------------------------------------------------------------------


def _image_folder(root, sizes=(16, 16), captions=None, extra_files=()) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(sizes):
        PIL.Image.new("RGB", (size, size), (40 * index, 80, 120)).save(root / f"{index}.png")
    for name in extra_files:
        (root / name).write_bytes(b"not an image")
    captions = captions if captions is not None else {f"{i}.png": CAPTIONS[i % 3] for i in range(len(sizes))}
    lines = [json.dumps({"file": name, "caption": text}) for name, text in captions.items()]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", "9.png is not a readable image"),
        ("uncaptioned", "1.png has no caption"),
        ("caption_without_file", "names 'missing.png', which is not a file"),
        ("wrong_size", "1.png is 24x24; expected 16x16 .*resize"),
    ],
)
def test_bad_image_folder_raises_naming_the_file(tmp_path, case, message):
    """Each defect of a captioned image folder is a ValueError naming the file, raised when the folder is read."""
    folder = {
        "unreadable": lambda: _image_folder(tmp_path, extra_files=["9.png"],
                                            captions={"0.png": "a", "1.png": "b", "9.png": "c"}),
        "uncaptioned": lambda: _image_folder(tmp_path, captions={"0.png": "a red circle"}),
        "caption_without_file": lambda: _image_folder(tmp_path, captions={"0.png": "a", "1.png": "b",
                                                                          "missing.png": "c"}),
        "wrong_size": lambda: _image_folder(tmp_path, sizes=(16, 24)),
    }[case]()  # fmt: skip
    with pytest.raises(ValueError, match=message):
        CaptionedImageFolder(folder, 16)


def test_a_resume_names_an_accelerate_too_old_to_load_checkpoints(tiny_text, tmp_path, monkeypatch, straight_run):
    """accelerate 0.33 (the minimum) fails inside `load_state` under torch >= 2.6 (KeyError: 'step'): named before
    any model runs."""
    from packaging.version import Version

    from if_diffusers.training import trainer

    monkeypatch.setattr(trainer, "accelerate_version", lambda: Version("0.33.0"))
    unet = tiny_unet("I")
    calls = _count_calls(unet)
    checkpoint = straight_run[0] / "checkpoints" / "checkpoint-2"
    with pytest.raises(ValueError, match=r"resuming needs accelerate >= 1\.10\.1; accelerate 0\.33\.0 cannot"):
        train(_config(tmp_path, resume_from_checkpoint=checkpoint), unet, *tiny_text, Pairs(3))
    assert calls == []


def test_bad_run_inputs_raise_before_any_step(tiny_text, tmp_path):
    """A non-empty output folder (without overwrite or resume), a dataset image of the wrong size, a stage II UNet
    for stage I and invalid settings raise ValueError before the UNet or T5 runs."""
    tokenizer, text_encoder = tiny_text
    unet = tiny_unet("I")
    unet_calls, text_calls = _count_calls(unet), _count_calls(text_encoder)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="output_dir=.* exists and is not empty"):
        train(_config(tmp_path), unet, tokenizer, text_encoder, Pairs(3))
    with pytest.raises(ValueError, match=r"dataset\[0\] is 24x24; expected 16x16"):
        train(_config(tmp_path, "other"), unet, tokenizer, text_encoder, Pairs(3, size=24))
    with pytest.raises(ValueError, match="stage I expects 3 in"):
        train(_config(tmp_path, "other"), tiny_unet("II"), tokenizer, text_encoder, Pairs(3))
    with pytest.raises(ValueError, match="resume_from_checkpoint=.* is not a checkpoint folder"):
        train(_config(tmp_path, "other", resume_from_checkpoint=tmp_path), unet, tokenizer, text_encoder, Pairs(3))
    super_resolution = tiny_unet("II")
    super_resolution_calls = _count_calls(super_resolution)
    with pytest.raises(ValueError, match="^max_noise_level=1001: the unet's augmentation schedule has only 1000"):
        train(_config(tmp_path, "other", stage="II", resolution=32, max_noise_level=1001), super_resolution,
              tokenizer, text_encoder, ShapesDataset(2, seed=0, size=32))  # fmt: skip
    assert super_resolution_calls == []
    with pytest.raises(ValueError, match=r"^coarse_noise_min_timestep=1000: expected a step of the scheduler's 1000 "
                                         r"\(0 to 999\)"):  # fmt: skip
        train(_config(tmp_path, "other", noise_offset=0.1, coarse_noise_min_timestep=1000), unet, tokenizer,
              text_encoder, Pairs(3))  # fmt: skip
    assert unet_calls == [] and text_calls == [] and (tmp_path / "run" / "notes.txt").read_text() == "keep me"
    # the last: coarse_noise_min_timestep without offset or pyramid noise
    for field, value in [("stage", "III"), ("text_dropout", 1.5), ("train_batch_size", 0), ("lora_rank", 0),
                         ("mixed_precision", "fp8"), ("lr_scheduler", "cosine_with_restarts"), ("ema_decay", 1.0),
                         ("validation_steps", 2), ("snr_gamma", 0.0), ("noise_offset", -0.1),
                         ("pyramid_noise_discount", 1.0), ("timestep_bias_portion", 2.0),
                         ("timestep_bias_multiplier", 0.0), ("max_noise_level", 0), ("max_noise_level", 350),
                         ("low_res_blur", 0.5), ("coarse_noise_min_timestep", -1),
                         ("coarse_noise_min_timestep", 700)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"^{field}="):
            _config(tmp_path, **{field: value})
    for blur in (0.0, 4.5):  # stage II, out of range (low-res pixels, at most MAX_BLUR)
        with pytest.raises(ValueError, match=rf"^low_res_blur={blur}: expected a number in \(0.0, 4.0\]"):
            _config(tmp_path, stage="II", resolution=32, low_res_blur=blur)


# --- command line -------------------------------------------------------------------------------------------------


def test_command_line_fine_tunes_a_saved_pipeline(straight_run, tmp_path, capsys):
    """`scripts/train.py` / `if-diffusers train` fine-tunes the saved pipeline on a csv-captioned folder and writes a
    loadable pipeline; a bad folder, or a bad option, is one error line and exit code 1."""
    data = tmp_path / "data"
    _image_folder(data, sizes=(16, 16, 16))
    (data / "captions.jsonl").unlink()
    (data / "captions.csv").write_text('file,caption\n0.png,"a red circle, large"\n1.png,a green square\n'
                                       "2.png,a yellow triangle\n")  # fmt: skip
    assert CaptionedImageFolder(data, 16).captions[0] == "a red circle, large"
    arguments = ["--model", str(straight_run[1]), "--stage", "I", "--train-data", str(data), "--resolution", "16",
                 "--output-dir", str(tmp_path / "out"), "--max-train-steps", "2", "--train-batch-size", "2",
                 "--no-ema", "--lr-scheduler", "linear", "--checkpointing-steps", "1"]  # fmt: skip
    assert train_main(arguments) == 0
    IFPipeline.from_pretrained(tmp_path / "out" / "pipeline")
    checkpoints = tmp_path / "out" / "checkpoints"
    assert _learning_rate(checkpoints / "checkpoint-1") == pytest.approx(0.5e-5)  # TrainingConfig's 1e-5, halfway
    assert _learning_rate(checkpoints / "checkpoint-2") == 0.0
    assert train_main([*arguments, "--resolution", "32"]) == 1
    assert "is 16x16; expected 32x32" in capsys.readouterr().err
    assert train_main([*arguments, "--coarse-noise-min-timestep", "500"]) == 1  # reaches TrainingConfig's check
    assert "coarse_noise_min_timestep=500 with no noise_offset" in capsys.readouterr().err


def test_command_line_trains_from_a_float16_cascade_folder(tmp_path):
    """A cascade folder stored in float16 (the bundled demo) is trained in float32: T5 loaded as stored had fed
    float16 embeddings to the float32 UNet ("mat1 and mat2 must have the same dtype"). With the gated coarse noise on."""
    from if_diffusers.demo_cascade import bundled_model_path

    arguments = ["--model", str(bundled_model_path()), "--stage", "I", "--synthetic-shapes", "2", "--resolution", "32",
                 "--output-dir", str(tmp_path / "out"), "--max-train-steps", "1", "--train-batch-size", "2",
                 "--noise-offset", "0.5", "--pyramid-noise-discount", "0.9", "--coarse-noise-min-timestep", "500"]  # fmt: skip
    assert train_main(arguments) == 0
    from if_diffusers import IFCascadePipeline

    trained = IFCascadePipeline.from_pretrained(tmp_path / "out" / "pipeline")  # the cascade, with the trained stage
    assert {p.dtype for p in trained.stage_1_unet.parameters()} == {torch.float32}


def test_lora_without_peft_installed_is_a_clear_error(tmp_path, monkeypatch):
    """PEFT is an extra (`if-diffusers[lora]`): without it, LoRA training stops at the config, before any model."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(
        ValueError, match=r"lora_rank=4: LoRA training needs the peft package \(pip install 'if-diffusers\[lora\]'\)"
    ):
        _config(tmp_path, lora_rank=4)
