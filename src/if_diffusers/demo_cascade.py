"""The small demo IF cascade of the synthetic shapes (`if_diffusers.synthetic`): how it is built, where the trained
one ships, and how its quality is measured.

Built from: a T5 tokenizer whose sentencepiece vocabulary is trained on the captions' words, a tiny T5 encoder with
random weights from a fixed seed (frozen, as IF's T5: the UNets learn to read whatever features it gives), a small
stage-I UNet and a small x4 super-resolution UNet of this package's classes. `scripts/train_demo_cascade.py` trains
the UNets with `if_diffusers.training`; the result ships inside the package (`bundled_model_path`,
`load_demo_cascade`) and is what `if-diffusers generate` runs when no `--model` is given.

Quality: images generated from held-out captions (shape/colour pairs never seen in training) are read by the
deterministic analyser (`synthetic.analysis`), at stage I and after stage II; the same architecture with random
weights is the chance-level reference.
"""

from __future__ import annotations

import re
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .models import IFSuperResUNet2DConditionModel, IFUNet2DConditionModel
from .models.original_params import OriginalUNetParams
from .synthetic import analysis, shapes

DEMO_SEED = 0
BUNDLED_MODEL_FOLDER = "demo_model"  # inside the package: the trained cascade (float16 weights)
MODEL_CARD = "IF-demo-shapes.md"  # in model_cards/
# The fast sampling presets the quality scores are measured with (IF's own respacings, as the original README's).
QUALITY_STEPS: dict[str, Any] = {"stage_1_timesteps": "smart50", "stage_2_timesteps": "smart27"}
# Stage II's augmentation of stage I's images: 100, not IF's 250. The demo's stage II trains on levels in [0, 350)
# (`max_noise_level`); at 250 it washes out the shapes that stage I drew faint or off-colour. Chosen on validation
# captions (held-out records 64-127, not the benchmark's 0-63; after stage II, colour / shape): 250 0.86 / 0.56,
# 175 0.89 / 0.61, 100 0.89 / 0.66 (model card).
STAGE_2_NOISE_LEVEL = 100
# Stage I's guidance: 2, not IF's 7. At 7 (with IF's dynamic thresholding) its samples overshoot at the shapes' edges:
# dark rims, rounded square corners, triangles read as crosses. Chosen on validation captions (held-out records
# 64-191, stage I, colour / shape): 7 0.98 / 0.70, 4 0.97 / 0.73, 3 0.95 / 0.76, 2 0.95 / 0.79, 1.5 0.90 / 0.79
# (model card).
STAGE_1_GUIDANCE_SCALE = 2.0
# Stage II's guidance: 6, not IF's 4. Its cross-attention reads the caption a little (`STAGE_2_PARAMS`), and guidance
# lets that keep shapes stage I drew. Chosen on validation captions (held-out records 64-191 after the same stage-I
# samples, 103 shapes right; after stage II, shape / shapes kept), on a first run of the recipe: 4 0.73 / 88,
# 6 0.79 / 93, 8 0.79 / 91, 12 0.74 / 86; the bundled run at 6: 0.82 / 95. It costs squares their sharp corners,
# which the benchmark's captions show. With the low-res consistency below it matters little (the same captions, 103
# right at stage I; kept / fixed, shape after stage II): 2 97 / 9, 0.83; 4 99 / 8, 0.84; 6 98 / 9, 0.84 (model card).
STAGE_2_GUIDANCE_SCALE = 6.0
QUALITY_GUIDANCE: dict[str, Any] = {
    "stage_1_guidance_scale": STAGE_1_GUIDANCE_SCALE, "stage_2_guidance_scale": STAGE_2_GUIDANCE_SCALE,
}  # fmt: skip
# Stage II holds its samples to stage I's images at stage I's own scale (`low_res_consistency_factor`, ILVR, Choi et
# al. 2021): after every step the content coarser than 4 pixels of 128 (32x32, what stage I resolves) is replaced by
# stage I's image upsampled and diffused to that step, and the UNet draws only the finer detail. Guidance at 6 had
# melted shapes faint against their background (orange squares on yellow). Chosen on validation captions (held-out
# records 64-191, 105 shapes right at stage I; kept / fixed, shape after stage II): 4 99 / 6, 0.82; 2 98 / 1, 0.77;
# off 92 / 5, 0.76 (with other stage-II seeds; seeds move these by about 4) (model card).
STAGE_2_LOW_RES_CONSISTENCY_FACTOR = 4
# Stage II's presets besides steps and guidance, which `if-diffusers generate` keeps under --steps and --guidance.
QUALITY_STAGE_2: dict[str, Any] = {
    "stage_2_noise_level": STAGE_2_NOISE_LEVEL, "stage_2_low_res_consistency_factor": STAGE_2_LOW_RES_CONSISTENCY_FACTOR,
}  # fmt: skip
QUALITY_CALL: dict[str, Any] = {**QUALITY_STEPS, **QUALITY_GUIDANCE, **QUALITY_STAGE_2}
TEXT_WIDTH = 64  # the tiny T5's d_model: the UNets' encoder_dim
RELATIVE_BIAS_STD = 3.0  # the tiny T5's relative-position biases (`demo_text_encoder`)
TEXT_LAYERS = 1  # the tiny T5's depth (`demo_text_encoder`)
STAGE_1_SIZE = 32
STAGE_2_SIZE = 4 * STAGE_1_SIZE
SUPER_RESOLUTION_CROP = 64  # stage II trains on crops of this side of its 128x128 targets (a large shape is up to
# 46 pixels across there: a 64x64 crop can hold it whole, a 32x32 one never; model card)
# The original IF's params (as in `models.presets`), at a size a 2-core CPU trains in under an hour.
STAGE_1_PARAMS: dict[str, Any] = {
    "image_size": STAGE_1_SIZE, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
    "channel_mult": "1,2,4", "attention_resolutions": "8", "num_heads": 1, "num_head_channels": 32,
    "use_scale_shift_norm": True, "resblock_updown": True, "encoder_dim": TEXT_WIDTH, "encoder_channels": 128,
    "activation": "gelu", "att_pool_heads": 2, "disable_self_attentions": False, "precision": "32",
}  # fmt: skip
# Stage II's attention reads the text alone, at 32x32 and 16x16 of 128x128 and in the middle block (IF's params name
# them by image_size // resolution: "32,16"): trained on crops, self-attention would see 16 times fewer pixels than at
# sampling, as Imagen drops self-attention from its crop-trained super-resolution stage. With the middle block's
# alone it kept 86 of 103 validation shapes and ignored its caption (swapping the shape word moved its samples 0.0013
# per pixel); with these it keeps 93 and 95 in two runs at guidance 6 (swap: 0.0042; model card).
STAGE_2_PARAMS: dict[str, Any] = {
    **STAGE_1_PARAMS, "image_size": STAGE_2_SIZE, "in_channels": 6, "channel_mult": "1,1,2,4",
    "attention_resolutions": "32,16", "disable_self_attentions": "32,16", "efficient_activation": True,
    "scale_skip_connection": True,
}  # fmt: skip
# IF's GroupNorm has 32 groups at every width. At the demo's width 32 that is one channel per group: each feature is
# normalised by its own mean over the image, which erases a plain colour, and stage II has to copy the colours of its
# low-res input. Stage II uses 8 groups, 4 channels each, near IF-II-L's 5 at its first level (width 160; model card).
STAGE_2_NORM_GROUPS = 8


def bundled_model_path() -> Path:
    """The trained demo cascade's folder inside the installed package (an `IFCascadePipeline` without stage III)."""
    folder = Path(str(resources.files(__package__) / BUNDLED_MODEL_FOLDER))
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled demo model is missing ({folder / 'model_index.json'} does not exist): this installation of "
            "if-diffusers is incomplete; reinstall it, or pass a model with --model / from_pretrained"
        )
    return folder


def load_demo_cascade(torch_dtype: torch.dtype = torch.float32, **kwargs: Any):
    """`IFCascadePipeline.from_pretrained(bundled_model_path(), torch_dtype=torch_dtype, **kwargs)`: 32x32 at stage I,
    128x128 after stage II. Its weights are stored in float16; float32 (the default) suits CPUs."""
    from .installed_versions import dtype_argument
    from .pipelines import IFCascadePipeline

    return IFCascadePipeline.from_pretrained(bundled_model_path(), **dtype_argument(torch_dtype), **kwargs)


def unknown_words(prompt: str) -> list[str]:
    """The words of `prompt` outside the captions' vocabulary, in order (the demo's tokenizer reads them as <unk>)."""
    vocabulary = set(shapes.caption_vocabulary())
    return [word for word in re.findall(r"[a-z]+", prompt.lower()) if word not in vocabulary]


def demo_tokenizer(captions_sample: int = 2000):
    """A T5 tokenizer with one sentencepiece piece per caption word (a word model trained on `captions_sample`
    captions of both splits, so every word of `shapes.caption_vocabulary()` is a piece)."""
    import sentencepiece as spm

    from .installed_versions import t5_tokenizer

    captions = [shapes.sample_record(i, DEMO_SEED).caption for i in range(captions_sample)]
    captions += [shapes.sample_record(i, DEMO_SEED, held_out=True).caption for i in range(captions_sample // 10)]
    with tempfile.TemporaryDirectory() as folder:
        text = Path(folder) / "captions.txt"
        text.write_text("\n".join(captions))
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(Path(folder) / "spiece"), model_type="word",
            vocab_size=len(shapes.caption_vocabulary()) + 3, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
            bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2,
        )  # fmt: skip
        pieces = spm.SentencePieceProcessor(model_file=str(Path(folder) / "spiece.model"))
        vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    missing = set(shapes.caption_vocabulary()) - {piece.lstrip("\u2581") for piece, _ in vocab}
    if missing:
        raise RuntimeError(f"the demo tokenizer lacks caption words {sorted(missing)}")
    return t5_tokenizer(vocab, extra_ids=0, model_max_length=77)


def demo_text_encoder(vocab_size: int, seed: int = DEMO_SEED):
    """A T5 encoder of `TEXT_LAYERS` layers and width `TEXT_WIDTH` with random weights from `seed` (frozen, never
    trained).

    Its relative-position biases are drawn at std `RELATIVE_BIAS_STD` instead of T5's initial d_model**-0.5 (0.125):
    at T5's, attention is near uniform, every output is its own word plus the sentence's mean, and which colour names
    the shape and which the background cannot be read from the outputs at all (an attention-pooling probe trained on
    training captions reads the shape's colour of held-out captions at chance, 0.11; at std 3, 0.998). With sharp
    random biases each head mixes in words at its own offsets, as a trained T5's learnt biases let it.

    One layer, not two: each random layer also mixes the next word into a colour word's output, through its gated
    feed-forward nonlinearly, so a second layer made "green" in "green triangle" (a held-out pair) a vector no training
    caption gives (cosine 0.79 to "green" before the other shapes; stage I drew those triangles yellow). With one
    layer the colour words keep their identity (cosine to their other-shape mean: at least 0.88 over all pairs, 0.79
    with two) and the shape's colour stays as readable (swapping the shape's and background's colour words moves
    the outputs 1.20 times as far as changing one, 1.28 with two).
    """
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_WIDTH, d_kv=16, d_ff=2 * TEXT_WIDTH, num_layers=TEXT_LAYERS,
                      num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    encoder = T5EncoderModel(config)
    # T5's first layer holds the relative biases (deeper layers, when there are any, reuse them).
    torch.nn.init.normal_(encoder.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
                          std=RELATIVE_BIAS_STD)  # fmt: skip
    return encoder.eval().requires_grad_(False)


def demo_unet(stage: str, seed: int = DEMO_SEED):
    """The demo's stage "I" or "II" UNet with diffusers' initialisation from `seed`."""
    params, cls = (
        (STAGE_1_PARAMS, IFUNet2DConditionModel) if stage == "I" else (STAGE_2_PARAMS, IFSuperResUNet2DConditionModel)
    )
    config = OriginalUNetParams.parse(params).to_unet_config()
    if stage == "II":
        config["norm_num_groups"] = STAGE_2_NORM_GROUPS
    torch.manual_seed(seed)
    return cls.from_config(config)


class SuperResolutionCrops:
    """Stage II's training data: `length` square crops of side `crop` from `shapes.render(record, size)` of the
    training records, each an `Example` whose caption is its whole image's. The crop's corner is a pure function
    of `(seed, index)` and a multiple of 4, so the crop's x4 downsample is a crop of the downsampled image.

    As Imagen trains its last super-resolution stage: the UNet is convolutional (its one attention reads the text
    only), so it learns from crops at the scale it then upsamples whole images, at a quarter of the cost of 128x128
    targets (64x64 crops). `crop=size` gives whole images (`scripts/train_demo_cascade.py` can end stage II's
    training on them: GroupNorm statistics differ between small crops and whole images).

    `colour_jitter` > 0 moves each image's colours off the palette: every channel `c` (in [0, 1]) becomes
    `clip(c + offset + gain (c - 1/2))` with `offset` and `gain` uniform on `[-colour_jitter, colour_jitter]`, drawn
    per image and channel from `(seed, index)`. The map is affine per channel, so antialiased edges stay the
    area-weighted mix of their two colours. Stage I's samples are near, not on, the palette (a beige for white); a
    super-resolution UNet that only saw palette colours snaps such inputs back to palette colours in blotches.
    """

    def __init__(self, length: int, seed: int = DEMO_SEED, size: int = STAGE_2_SIZE,
                 crop: int = SUPER_RESOLUTION_CROP, colour_jitter: float = 0.0) -> None:  # fmt: skip
        if not isinstance(crop, int) or crop % 4 or not 4 <= crop <= size:
            raise ValueError(f"`crop` is {crop!r}; expected a multiple of 4 between 4 and `size` ({size}).")
        if not isinstance(colour_jitter, (int, float)) or not 0.0 <= colour_jitter <= 0.5:
            raise ValueError(f"`colour_jitter` is {colour_jitter!r}; expected a number in [0, 0.5].")
        self.shapes = shapes.ShapesDataset(length, seed, size)
        self.crop = crop
        self.colour_jitter = float(colour_jitter)
        self.captions = [shapes.sample_record(i, seed).caption for i in range(length)]

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> shapes.Example:
        example = self.shapes[index]
        corners = np.random.default_rng((self.shapes.seed, index, 2)).integers(
            0, (self.shapes.size - self.crop) // 4 + 1, 2
        )
        left, top = (4 * int(c) for c in corners)
        image = example.image.crop((left, top, left + self.crop, top + self.crop))
        if self.colour_jitter:
            offset, gain = np.random.default_rng((self.shapes.seed, index, 3)).uniform(
                -self.colour_jitter, self.colour_jitter, (2, 3)
            )
            pixels = np.asarray(image, np.float32) / 255
            pixels = np.clip(pixels + offset + gain * (pixels - 0.5), 0.0, 1.0)
            image = Image.fromarray((pixels * 255 + 0.5).astype(np.uint8))
        return shapes.Example(image, example.caption, example.record)


def quality_scores(pipeline, count: int = 64, seed: int = DEMO_SEED, batch_size: int = 16,
                   **call: Any) -> dict[str, dict[str, float]]:  # fmt: skip
    """Analyser accuracies (colour, shape, position, all) of images generated by an `IFCascadePipeline` without
    stage III from `count` held-out captions: `{"stage_1": ..., "stage_2": ...}` (stage II read at its x4 size,
    which the analyser brings to its working size). The captions are records `0..count-1` of the held-out stream
    `seed` (`shapes.sample_record(i, seed, held_out=True)`), and each batch's generator is seeded `seed` + its first
    record. `call` goes to the pipeline (steps, guidance...); with `last_stage=1` only stage I runs and is scored."""
    records = [shapes.sample_record(i, seed, held_out=True) for i in range(count)]
    stage_1_only = call.get("last_stage") == 1
    stage_1, stage_2 = [], []
    for start in range(0, count, batch_size):
        batch = records[start : start + batch_size]
        output = pipeline([r.caption for r in batch], generator=torch.Generator().manual_seed(seed + start),
                          return_intermediates=not stage_1_only, **call)  # fmt: skip
        stage_1 += output.images if stage_1_only else output.stage_1_images
        stage_2 += [] if stage_1_only else output.images
    scores = {"stage_1": analysis.score(stage_1, records)}
    return scores if stage_1_only else {**scores, "stage_2": analysis.score(stage_2, records)}


def super_resolution_scores(cascade, count: int = 16, seed: int = DEMO_SEED, **call: Any) -> dict[str, float]:
    """Stage II alone, as a super-resolution model: it upsamples the clean 32x32 downsamples (PIL bicubic, as
    training makes them) of `count` held-out captions' 128x128 renderings, and the analyser reads the results.
    Returns its accuracies (colour, shape, position, all) and "mae", the mean absolute difference from the
    renderings in `[0, 1]`. `call` goes to the stage's pipeline (default `QUALITY_CALL`'s steps, level and stage-II
    guidance)."""
    from .pipelines import IFSuperResolutionPipeline

    records = [shapes.sample_record(i, seed, held_out=True) for i in range(count)]
    targets = [shapes.render(record, STAGE_2_SIZE) for record in records]
    low_res = [target.resize((STAGE_1_SIZE, STAGE_1_SIZE), Image.BICUBIC) for target in targets]
    pipeline = IFSuperResolutionPipeline(**cascade._stage_components(2))  # the cascade's own stage II
    pipeline.set_progress_bar_config(disable=True)
    presets = {
        key.removeprefix("stage_2_"): value for key, value in QUALITY_CALL.items() if key.startswith("stage_2_")
    }
    call = {**presets, **call}  # timesteps, guidance_scale, noise_level
    images = pipeline(image=low_res, prompt=[r.caption for r in records],
                      generator=torch.Generator().manual_seed(seed), **call).images  # fmt: skip
    errors = [np.abs(np.asarray(image, np.float32) - np.asarray(target, np.float32)).mean() / 255
              for image, target in zip(images, targets)]  # fmt: skip
    return {**analysis.score(images, records), "mae": float(np.mean(errors))}


def random_weights_like(cascade):
    """`cascade` (a demo cascade) with both UNets at their random initial weights: the chance-level reference."""
    from .pipelines import IFCascadePipeline

    unets = {"stage_1_unet": demo_unet("I").to(cascade.dtype), "stage_2_unet": demo_unet("II").to(cascade.dtype)}
    return IFCascadePipeline(**{**cascade.components, **unets}, requires_safety_checker=False)


def benchmark_scores(cascade, count: int = 64, seed: int = DEMO_SEED, **call: Any) -> dict[str, dict[str, Any]]:
    """`quality_scores` of `cascade` and of `random_weights_like(cascade)` on the same `count` held-out captions of
    stream `seed`, with `QUALITY_CALL` updated by `call`: `{"trained": {...}, "random weights": {...}}`, each with
    its "seconds"."""
    results = {}
    for name, pipeline in (("trained", cascade), ("random weights", random_weights_like(cascade))):
        pipeline.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        results[name] = quality_scores(pipeline, count=count, seed=seed, **{**QUALITY_CALL, **call})
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    return results
