"""The demo cascade's building blocks: a tokenizer with a piece per caption word, a seeded frozen T5, and the quality
measure, which must give a perfect generator full marks and a shapeless one chance-level marks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import load_script

from if_diffusers.demo_cascade import (
    SuperResolutionCrops,
    demo_text_encoder,
    demo_tokenizer,
    quality_scores,
)
from if_diffusers.synthetic import shapes


def test_tokenizer_has_one_piece_per_caption_word_and_t5_is_seeded():
    tokenizer = demo_tokenizer()
    caption = "a small red triangle at the top left on a blue background"
    assert tokenizer.tokenize(caption) == ["\u2581" + word for word in caption.split()]
    assert len(tokenizer) == len(shapes.caption_vocabulary()) + 3  # <pad>, </s>, <unk>
    first, second = demo_text_encoder(len(tokenizer)), demo_text_encoder(len(tokenizer))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not any(p.requires_grad for p in first.parameters())


def _t5_outputs():
    """caption -> the demo T5's outputs (tokens x width)."""
    tokenizer = demo_tokenizer()
    encoder = demo_text_encoder(len(tokenizer))

    def outputs(caption: str) -> torch.Tensor:
        with torch.no_grad():
            return encoder(input_ids=tokenizer(caption, return_tensors="pt").input_ids).last_hidden_state[0]

    return outputs


def test_t5_outputs_tell_which_colour_is_the_shapes():
    """Cross-attention reads T5's outputs as a set, so swapping the shape's and the background's colour words must move
    that set as far as changing a colour word does (T5's own initial relative biases give 0.13 of it here: a bag of
    words, from which no UNet can bind a colour to the shape)."""
    outputs = _t5_outputs()

    def set_distance(a: torch.Tensor, b: torch.Tensor) -> float:  # symmetric Chamfer distance
        distances = torch.cdist(a, b)
        return 0.5 * (distances.min(1).values.mean() + distances.min(0).values.mean()).item()

    reference = outputs("a red circle on a blue background")
    swapped = set_distance(reference, outputs("a blue circle on a red background"))
    changed = set_distance(reference, outputs("a green circle on a blue background"))
    assert swapped > 0.5 * changed, (swapped, changed)


def test_t5_colour_words_keep_their_identity_next_to_any_shape():
    """A held-out pair's colour word must come out of T5 close to what the same word gives next to the shapes it is
    trained with, or no UNet can draw the held-out pair's colour (with two random layers "green" before "triangle"
    was at cosine 0.79 and stage I drew those triangles yellow). Over all 40 pairs, the colour word's output against
    its mean over the other shapes: the demo's one-layer T5 gives at least 0.88."""
    outputs = _t5_outputs()
    colour_word = {(colour, shape): outputs(f"a large {colour} {shape} in the middle on a black background")[2]
                   for colour in shapes.COLOURS for shape in shapes.SHAPES}  # fmt: skip
    similarities = {}
    for (colour, shape), word in colour_word.items():
        others = torch.stack([colour_word[colour, other] for other in shapes.SHAPES if other != shape]).mean(0)
        similarities[colour, shape] = torch.cosine_similarity(word, others, dim=0).item()
    assert min(similarities.values()) > 0.85, sorted(similarities.items(), key=lambda item: item[1])[:3]


class _Renderer:
    """A stand-in cascade: draws each caption's ground truth (`perfect`) or a shapeless random field."""

    def __init__(self, perfect: bool, count: int):
        self.perfect = perfect
        self.records = {shapes.sample_record(i, 0, held_out=True).caption: shapes.sample_record(i, 0, held_out=True)
                        for i in range(count)}  # fmt: skip
        self.calls = []

    def __call__(self, prompts, generator, return_intermediates, **call):
        self.calls.append(call)
        rng = np.random.default_rng(len(self.calls))

        def draw(prompt: str, size: int) -> PIL.Image.Image:
            if self.perfect:
                return shapes.render(self.records[prompt], size)
            field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            return PIL.Image.fromarray(field).resize((size, size), PIL.Image.BICUBIC)

        return SimpleNamespace(stage_1_images=[draw(p, 32) for p in prompts], images=[draw(p, 128) for p in prompts])


def test_quality_scores_give_a_perfect_generator_full_marks_and_noise_chance():
    perfect, noise = _Renderer(True, 32), _Renderer(False, 32)
    good = quality_scores(perfect, count=32, batch_size=8, stage_1_timesteps="smart50")
    bad = quality_scores(noise, count=32, batch_size=8)
    assert len(perfect.calls) == 4 and perfect.calls[0] == {"stage_1_timesteps": "smart50"}
    # The analyser reads 99% of clean renderings' shapes at 32x32 (stage I) as at 128x128 (stage II).
    for stage in ("stage_1", "stage_2"):
        assert good[stage]["colour"] == 1.0 and good[stage]["shape"] >= 0.95 and good[stage]["position"] == 1.0
        assert good[stage]["background"] == 1.0
        assert bad[stage]["colour"] < 0.4 and bad[stage]["all"] < 0.1 and bad[stage]["background"] < 0.3


def test_super_resolution_crops_are_seeded_4_aligned_crops_of_the_renderings():
    crops, again = SuperResolutionCrops(8, crop=32), SuperResolutionCrops(8, crop=32)
    for index in range(8):
        example = crops[index]
        whole = np.asarray(shapes.render(example.record, 128))
        crop = np.asarray(example.image)
        assert crop.shape == (32, 32, 3) and example.caption == example.record.caption
        matches = [(top, left) for top in range(0, 97, 4) for left in range(0, 97, 4)
                   if np.array_equal(whole[top : top + 32, left : left + 32], crop)]  # fmt: skip
        assert matches, index  # a crop of the rendering at a corner on the 4-pixel grid
        assert np.array_equal(np.asarray(again[index].image), crop)  # seeded


def test_colour_jitter_moves_each_channel_by_one_affine_map_off_the_palette():
    plain, jittered = SuperResolutionCrops(16, crop=128), SuperResolutionCrops(16, crop=128, colour_jitter=0.1)
    palette = {tuple(colour) for colour in shapes.COLOURS.values()}
    moved = 0
    for index in range(16):
        before = np.asarray(plain[index].image, np.float64) / 255
        pixels = np.asarray(jittered[index].image)
        after = pixels / 255
        moved += tuple(pixels[0, 0]) not in palette
        for channel in range(3):
            x, y = before[..., channel].ravel(), after[..., channel].ravel()
            inside = (y > 0) & (y < 1)  # not clipped
            if inside.sum() < 2 or np.ptp(x[inside]) < 0.05:
                continue
            slope, intercept = np.polyfit(x[inside], y[inside], 1)
            assert np.abs(slope * x[inside] + intercept - y[inside]).max() < 1.5 / 255, (index, channel)
            assert 0.89 <= slope <= 1.11, (index, channel, slope)  # 0.9-1.1, give or take uint8 rounding
            assert abs(intercept + 0.5 * (slope - 1)) <= 0.11, (index, channel, intercept)  # the offset
    assert moved >= 14  # background corners off the palette
    with pytest.raises(ValueError, match="colour_jitter.*0.7.*\\[0, 0.5\\]"):
        SuperResolutionCrops(4, colour_jitter=0.7)


@pytest.fixture(scope="module")
def train_script():
    """`scripts/train_demo_cascade.py` as a module."""
    return load_script("train_demo_cascade")


def test_train_script_rejects_a_given_stage_2_with_whole_image_steps(train_script, tmp_path, capsys):
    """A given stage II is used as it is: asking for whole-image steps on it as well is an error, not ignored."""
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--output", str(tmp_path / "run"), "--stage-2", str(tmp_path / "two"),
                           "--stage-2-whole-steps", "5"])  # fmt: skip
    assert exit_info.value.code == 2 and "--stage-2-whole-steps 5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("step", ["-1", "1000"])
def test_train_script_rejects_a_coarse_noise_step_off_the_schedule_before_training(train_script, tmp_path, capsys,
                                                                                   step):  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--output", str(tmp_path / "run"), "--stage-1-tune-coarse-noise-min-timestep", step])
    assert exit_info.value.code == 2
    assert f"--stage-1-tune-coarse-noise-min-timestep is {step}; expected a step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("crop", ["30", "0", "132"])
def test_train_script_rejects_a_bad_stage_2_crop_before_training(train_script, tmp_path, capsys, crop):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--output", str(tmp_path / "run"), "--stage-2-crop", crop])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--stage-2-crop: `crop` is {crop}" in error and "multiple of 4" in error, error
    assert not (tmp_path / "run").exists()


def test_train_script_gives_stage_2_its_own_crop_and_batch(train_script, tmp_path, monkeypatch):
    """`--stage-2-crop` / `--stage-2-batch-size` reach stage II's dataset and config; stage I keeps `--batch-size`;
    the defaults are the bundled model's recipe (64x64 crops, batch 8, no whole-image phase)."""
    seen = {}

    def fake_train(config, unet, tokenizer, text_encoder, dataset, scheduler):
        seen[config.stage] = (config.resolution, config.train_batch_size, len(dataset), dataset[0].image.size)
        return tmp_path / config.stage

    monkeypatch.setattr(train_script, "train", fake_train)
    options = ["--output", str(tmp_path), "--stage-1-steps", "2", "--stage-2-steps", "3", "--batch-size", "5"]
    for extra, crop, batch in (([], 64, 8), (["--stage-2-crop", "32", "--stage-2-batch-size", "32"], 32, 32)):
        args = train_script.argument_parser().parse_args(options + extra)
        train_script.train_stage("I", 2, tmp_path, None, None, args)
        train_script.train_stage("II", 3, tmp_path, None, None, args)
        assert seen["I"] == (32, 5, 10, (32, 32))
        assert seen["II"] == (crop, batch, 3 * batch, (crop, crop))
    defaults = train_script.argument_parser().parse_args(["--output", str(tmp_path)])
    assert (defaults.stage_2_steps, defaults.stage_2_whole_steps) == (3000, 0)


def test_train_script_tunes_stage_1_on_trained_stages_with_coarse_noise(train_script, tmp_path, monkeypatch):
    """With `--stage-1` and `--stage-2` folders the script trains only stage I's tune phase: the given stage I's UNet,
    on other records (seed 2) with the tune phase's offset and pyramid noise (from step 500) and rate, and saves the
    cascade of the tuned stage I and the given stage II; `--evaluation-count 0` scores nothing. The defaults are the
    bundled recipe."""
    from if_diffusers import IFPipeline, IFSuperResolutionPipeline
    from if_diffusers.demo_cascade import load_demo_cascade

    bundled = load_demo_cascade()
    stages = {"I": tmp_path / "one", "II": tmp_path / "two"}
    IFPipeline(**bundled._stage_components(1)).save_pretrained(stages["I"])
    IFSuperResolutionPipeline(**bundled._stage_components(2)).save_pretrained(stages["II"])
    seen = []

    def fake_train(config, unet, tokenizer, text_encoder, dataset, scheduler):
        seen.append((config, dataset))
        folder = Path(config.output_dir) / "pipeline"
        IFPipeline.from_pretrained(stages["I"]).save_pretrained(folder)
        return folder

    monkeypatch.setattr(train_script, "train", fake_train)
    monkeypatch.setattr(train_script, "benchmark_scores", lambda *args, **kwargs: pytest.fail("scored"))
    output = tmp_path / "run"
    assert train_script.main(["--output", str(output), "--stage-1", str(stages["I"]), "--stage-2", str(stages["II"]),
                              "--stage-1-tune-steps", "3", "--evaluation-count", "0"]) == 0  # fmt: skip
    [(config, dataset)] = seen
    assert (config.stage, config.max_train_steps, config.noise_offset) == ("I", 3, 0.5)
    assert (config.pyramid_noise_discount, config.coarse_noise_min_timestep) == (0.9, 500)
    assert (config.learning_rate, config.seed, dataset.seed, len(dataset)) == (3e-4, 2, 2, 3 * 32)
    assert (output / "cascade" / "model_index.json").is_file() and not (output / "scores.json").exists()
    defaults = train_script.argument_parser().parse_args(["--output", str(tmp_path)])
    assert (defaults.stage_1_tune_steps, defaults.stage_1_tune_noise_offset) == (800, 0.5)


def test_train_script_drops_the_scratch_paths_from_the_saved_configs(train_script, tmp_path):
    """The saved (and bundled) cascade's configs name no path of the training machine; nothing else changes."""
    unet_folder = tmp_path / "cascade" / "stage_1_unet"
    unet_folder.mkdir(parents=True)
    config = {"_class_name": "IFUNet2DConditionModel", "_name_or_path": "/tmp/run/stage_I/pipeline/unet", "x": 1}
    (unet_folder / "config.json").write_text(json.dumps(config))
    train_script.drop_local_paths(tmp_path / "cascade")
    assert json.loads((unet_folder / "config.json").read_text()) == {"_class_name": "IFUNet2DConditionModel", "x": 1}
