"""Generate a dataset, fine-tune on it, generate again: `if-diffusers batch` writes an imagefolder that
`if-diffusers train` reads (captions from its `prompt` column), training a stage of a cascade folder (the bundled
demo by default) writes the cascade with that stage trained, fully or as a merged LoRA, and `generate --model` runs
it. Also the other datasets training reads: an imagefolder's metadata, and a `datasets` dataset saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_unet

from if_diffusers import IFCascadePipeline, IFPipeline
from if_diffusers.cli import main
from if_diffusers.demo_cascade import load_demo_cascade
from if_diffusers.synthetic import shapes
from if_diffusers.training import CaptionedImageFolder, ColumnsDataset, TrainingConfig, train
from if_diffusers.training.data import resize_and_crop

PROMPTS = [shapes.sample_record(i, 0).caption for i in range(4)]
TRAIN = ["--max-train-steps", "2", "--train-batch-size", "2", "--no-ema", "--checkpointing-steps", "10",
         "--learning-rate", "1e-3"]  # fmt: skip


def _state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.float() for name, tensor in unet.state_dict().items()}


def _same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def batch_folder(tmp_path_factory) -> Path:
    """Four demo prompts made by `if-diffusers batch` with the bundled model (128x128 images)."""
    root = tmp_path_factory.mktemp("loop")
    (root / "prompts.txt").write_text("\n".join(PROMPTS))
    assert main(["batch", str(root / "prompts.txt"), "-o", str(root / "shapes"), "--steps", "2", "--device", "cpu",
                 "--batch-size", "2"]) == 0  # fmt: skip
    return root / "shapes"


def test_batch_output_trains_stage_ii_of_the_bundled_cascade_and_generate_runs_the_result(batch_folder, tmp_path):
    folder = CaptionedImageFolder(batch_folder, 128)
    assert folder.captions == PROMPTS and folder.files == [f"{n:08d}-000.png" for n in range(1, 5)]
    output = tmp_path / "full"
    assert main(["train", "--stage", "II", "--train-data", str(batch_folder), "--resolution", "128", "--output-dir",
                 str(output), *TRAIN]) == 0  # fmt: skip
    bundled, trained = load_demo_cascade(), IFCascadePipeline.from_pretrained(output / "pipeline")
    assert _same(_state(trained.stage_1_unet), _state(bundled.stage_1_unet))  # the other stage as it was
    assert not _same(_state(trained.stage_2_unet), _state(bundled.stage_2_unet))
    image = tmp_path / "after.png"
    assert main(["generate", PROMPTS[0], "-o", str(image), "--model", str(output / "pipeline"), "--steps", "2",
                 "--device", "cpu"]) == 0  # fmt: skip
    with PIL.Image.open(image) as written:
        assert written.size == (128, 128)


def test_a_lora_of_stage_i_on_resized_batch_images_is_merged_into_the_cascade(batch_folder, tmp_path):
    """LoRA training of stage I on the 128x128 images resized to 32 (`--resize`): `lora/` holds the adapter for
    `load_lora_weights`, `pipeline/` the cascade whose stage I has it merged (the same outputs), and `generate`
    runs that cascade."""
    output, saved = tmp_path / "lora", tmp_path / "my-cascade"
    load_demo_cascade().save_pretrained(saved)  # a cascade folder of the user's, not the bundled one
    assert main(["train", "--model", str(saved), "--stage", "I", "--train-data", str(batch_folder), "--resolution",
                 "32", "--resize", "--lora-rank", "4", "--output-dir", str(output), *TRAIN]) == 0  # fmt: skip
    bundled, merged = load_demo_cascade(), IFCascadePipeline.from_pretrained(output / "pipeline")
    assert _same(_state(merged.stage_2_unet), _state(bundled.stage_2_unet))
    stage_1 = IFPipeline(tokenizer=bundled.tokenizer, text_encoder=bundled.text_encoder, unet=bundled.stage_1_unet,
                         scheduler=bundled.stage_1_scheduler, safety_checker=None, feature_extractor=None,
                         watermarker=None, requires_safety_checker=False)  # fmt: skip
    stage_1.load_lora_weights(output / "lora")
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 3, 32, 32, generator=generator), torch.randn(1, 8, 64, generator=generator)
    with torch.no_grad():
        adapted = stage_1.unet(sample, 500, encoder_hidden_states=text).sample
        base = merged.stage_1_unet(sample, 500, encoder_hidden_states=text).sample
        stage_1.unet.disable_adapters()
        original = stage_1.unet(sample, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(base, adapted, rtol=0, atol=1e-4)
    assert (base - original).abs().max() > 1e-3  # the LoRA changed stage I
    assert main(["generate", PROMPTS[1], "-o", str(tmp_path / "after.png"), "--model", str(output / "pipeline"),
                 "--steps", "2", "--device", "cpu"]) == 0  # fmt: skip


def test_training_reads_a_datasets_dataset_saved_to_disk(tmp_path, capsys):
    images = [shapes.render(shapes.sample_record(i, 0), 40) for i in range(4)]  # not square at 32: --resize
    dataset = datasets.Dataset.from_dict({"picture": images, "text": PROMPTS}).cast_column("picture",
                                                                                          datasets.Image())  # fmt: skip
    dataset.save_to_disk(tmp_path / "saved")
    arguments = ["train", "--stage", "I", "--dataset-name", str(tmp_path / "saved"), "--image-column", "picture",
                 "--resolution", "32", "--resize", "--output-dir", str(tmp_path / "out"), *TRAIN]  # fmt: skip
    assert main(arguments) == 0
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()
    assert main([*arguments, "--caption-column", "prompt", "--overwrite-output-dir"]) == 1
    assert (
        "caption_column='prompt' is not a column of the dataset; it has ['picture', 'text']" in capsys.readouterr().err
    )


def test_columns_dataset_reads_two_columns_and_checks_them():
    rows = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (8, 6))], "caption": ["a red circle"]})
    image, caption = ColumnsDataset(rows, "image", "caption", 4, resize=True)[0]
    assert image.size == (4, 4) and caption == "a red circle"
    with pytest.raises(ValueError, match=r"row 0 of column 'caption' is 3; expected a caption string"):
        ColumnsDataset(datasets.Dataset.from_dict({"image": [None], "caption": [3]}), "image", "caption", 4)


def _imagefolder(root: Path, rows: list[dict], sizes: dict[str, int] | None = None, name="metadata.jsonl") -> Path:
    for row in rows:
        path = root / row["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        side = (sizes or {}).get(row["file_name"], 16)
        PIL.Image.new("RGB", (side, side), (200, 30, 30)).save(path)
    (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_an_imagefolder_reads_its_caption_column_and_subfolders(tmp_path):
    rows = [{"file_name": "a/1.png", "text": "a red circle", "prompt": "p1"},
            {"file_name": "2.png", "text": "a green square", "prompt": "p2"}]  # fmt: skip
    folder = _imagefolder(tmp_path / ".cache" / "data", rows)  # a hidden folder above it hides none of its images
    assert CaptionedImageFolder(folder, 16).captions == ["p1", "p2"]  # prompt first, then text
    assert CaptionedImageFolder(folder, 16, caption_column="text").captions == ["a red circle", "a green square"]
    assert CaptionedImageFolder(folder, 16)[0][0].size == (16, 16)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_caption_column", r"has none of the caption columns \['prompt', 'text', 'caption'\] in its first row"),
        ("named_column_missing", r"entry 1 is .*; expected a 'file_name' and a 'label' string"),
        ("uncaptioned_in_subfolder", r"sub/3\.png has no caption"),
        ("escapes_the_folder", r"names '\.\./x\.png', which is not a file"),
        ("csv_without_file_name", r"metadata\.csv has header \['file', 'text'\]; expected columns \['file_name'\]"),
        ("caption_column_for_captions_jsonl", r"caption_column='text' names a column of metadata"),
        ("wrong_size", r"1\.png is 24x24; expected 16x16 .*resize"),
    ],
)
def test_a_bad_imagefolder_is_named(tmp_path, case, message):
    rows = [{"file_name": "1.png", "text": "a"}]
    caption_column = {"named_column_missing": "label", "caption_column_for_captions_jsonl": "text"}.get(case)
    if case == "no_caption_column":
        rows = [{"file_name": "1.png", "label": "a"}]
    _imagefolder(tmp_path, rows, sizes={"1.png": 24} if case == "wrong_size" else None)
    if case == "uncaptioned_in_subfolder":
        (tmp_path / "sub").mkdir()
        PIL.Image.new("RGB", (16, 16)).save(tmp_path / "sub" / "3.png")
    if case == "escapes_the_folder":
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "../x.png", "text": "a"}) + "\n")
    if case == "csv_without_file_name":
        (tmp_path / "metadata.jsonl").unlink()
        (tmp_path / "metadata.csv").write_text("file,text\n1.png,a\n")
    if case == "caption_column_for_captions_jsonl":
        (tmp_path / "metadata.jsonl").rename(tmp_path / "captions.jsonl")
        (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "1.png", "caption": "a"}) + "\n")
    with pytest.raises(ValueError, match=message):
        CaptionedImageFolder(tmp_path, 16, caption_column=caption_column)


def test_a_hidden_folder_above_the_data_does_not_hide_an_uncaptioned_image(tmp_path):
    folder = _imagefolder(tmp_path / ".cache" / "data", [{"file_name": "1.png", "text": "a"}])
    PIL.Image.new("RGB", (16, 16)).save(folder / "2.png")
    PIL.Image.new("RGB", (16, 16)).save(folder / ".thumbnail.png")  # hidden itself: not part of the dataset
    with pytest.raises(ValueError, match=r"2\.png has no caption \(1 image\(s\) without one\)"):
        CaptionedImageFolder(folder, 16)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--train-data", "x", "--image-column", "picture"], "--image-column applies to --dataset-name only"),
        (["--synthetic-shapes", "4", "--caption-column", "text"], "--caption-column applies to --train-data or"),
        (["--synthetic-shapes", "4", "--resize"], "--resize applies to --train-data or --dataset-name only"),
    ],
)
def test_training_options_that_do_not_apply_to_the_data_are_refused(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--stage", "I", "--resolution", "32", "--output-dir", str(tmp_path / "o"), *arguments])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_resize_and_crop_keeps_the_centre_of_the_short_side_scaled():
    pixels = np.zeros((60, 40, 3), np.uint8)
    pixels[10:50] = 255  # a white band: the centre 40x40 square, cropped after scaling by 1/2
    image = np.asarray(resize_and_crop(PIL.Image.fromarray(pixels), 20), dtype=int)
    assert image.shape == (20, 20, 3) and image[2:-2].min() == 255 and image[[0, -1]].min() > 200  # edges: bicubic


def test_output_pipeline_must_hold_the_trained_unet(tiny_text, tmp_path):
    tokenizer, text_encoder = tiny_text
    cascade_like = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=tiny_unet("I"),
                              scheduler=load_demo_cascade().stage_1_scheduler, safety_checker=None,
                              feature_extractor=None, watermarker=None, requires_safety_checker=False)  # fmt: skip
    config = TrainingConfig(stage="I", output_dir=tmp_path / "run", resolution=16, max_train_steps=1)
    with pytest.raises(ValueError, match=r"output_pipeline \(IFPipeline\) does not hold unet"):
        train(config, tiny_unet("I", seed=1), tokenizer, text_encoder, [(PIL.Image.new("RGB", (16, 16)), "a")],
              output_pipeline=cascade_like)  # fmt: skip
