"""`if-diffusers batch`: the prompt file read and checked line by line before anything loads, the output an
`imagefolder` dataset that `datasets` loads, every image a function of its prompt, seed and settings (equal to
`generate`'s, and the same on 1 process with batch 1 as on 2 processes with batch 3), and a run killed midway that a
rerun completes, every image once and nothing half-written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from if_diffusers import IFCascadePipeline
from if_diffusers.batch import image_folder
from if_diffusers.batch.jobs import merge_settings
from if_diffusers.batch.prompt_file import PromptLine, line_seed, read_prompt_file
from if_diffusers.cli import main
from if_diffusers.synthetic import shapes

STEPS = ["--steps", "2"]


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image, dtype=int)


def _images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    """A 64x48 source image and its mask, and an unreadable "image", beside the prompt files."""
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(8, 6, 3, generator=generator) * 255).byte().repeat_interleave(8, 0).repeat_interleave(8, 1)
    PIL.Image.fromarray(pixels.numpy()).save(tmp_path / "photo.png")
    mask = np.zeros((64, 48), np.uint8)
    mask[:32] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "notes.png").write_text("not an image")
    return {"image": tmp_path / "photo.png", "mask": tmp_path / "mask.png"}


# --- the prompt file ---------------------------------------------------------------------------------------------


def test_text_and_jsonl_prompt_files_are_read_line_by_line(tmp_path, sources):
    (tmp_path / "bom.txt").write_text("\ufeffa red circle\n", encoding="utf-8")  # as some editors save UTF-8
    assert read_prompt_file(tmp_path / "bom.txt")[0].prompt == "a red circle"
    text = read_prompt_file(_write(tmp_path / "p.txt", ["a red circle", "", "  a green square  "]))
    assert [(line.number, line.prompt, line.mode) for line in text] == [(1, "a red circle", "text2img"),
                                                                        (3, "a green square", "text2img")]  # fmt: skip
    rows = [{"prompt": "a", "seed": 7, "num_images": 2, "negative_prompt": "blurry", "stage_1_guidance_scale": 5},
            {"prompt": "b", "image": "photo.png"}, {"prompt": "c", "image": "photo.png", "mask": "mask.png"},
            {"prompt": "d", "mode": "img2img", "image": "photo.png", "stage_2_timesteps": [999, 500, 0]}]  # fmt: skip
    first, second, third, fourth = read_prompt_file(_write(tmp_path / "p.jsonl", rows))
    assert (first.seed, first.num_images, first.negative_prompt, first.settings) == (
        7, 2, "blurry", {"stage_1_guidance_scale": 5})  # fmt: skip
    assert (second.mode, second.source("image"), third.mode, third.source("mask")) == (
        "img2img", sources["image"], "inpaint", sources["mask"])  # fmt: skip
    assert fourth.settings == {"stage_2_timesteps": [999, 500, 0]}
    (off,) = read_prompt_file(
        _write(tmp_path / "q.jsonl", [{"prompt": "a", "stage_2_low_res_consistency_factor": None}])
    )
    assert off.settings == {"stage_2_low_res_consistency_factor": None}  # null: off, replacing a preset


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", r"line 2: not JSON"),
        ([1, 2], r"line 2: a JSON list; expected an object with a 'prompt'"),
        ({"text": "a"}, r"line 2: unknown field 'text'"),
        ({"prompt": "a", "stage_1_guidance": 5}, r"unknown field 'stage_1_guidance' \(did you mean 'stage_1_guidance_scale'\?\)"),
        ({"seed": 1}, r"line 2: field 'prompt' is missing"),
        ({"prompt": " "}, r"line 2: field 'prompt' is empty"),
        ({"prompt": 3}, r"line 2: field 'prompt' is 3; expected a string"),
        ({"prompt": "a", "stage_2_redraw_augmentation_noise": "no"}, r"field 'stage_2_redraw_augmentation_noise' is \"no\"; expected true or false"),
        ({"prompt": "a", "stage_1_timesteps": [999, "500"]}, r"field 'stage_1_timesteps' is \[999, \"500\"\]; expected a preset name"),
        ({"prompt": "a", "max_sequence_length": None}, r"field 'max_sequence_length' is null; expected an int \(null would pad"),
        ({"prompt": "a", "seed": "7"}, r"field 'seed' is \"7\"; expected an int"),
        ({"prompt": "a", "seed": -1}, r"field 'seed' is -1; expected an int in \[0, "),
        ({"prompt": "a", "seed": True}, r"field 'seed' is true; expected an int"),
        ({"prompt": "a", "num_images": 0}, r"field 'num_images' is 0; expected an int >= 1"),
        ({"prompt": "a", "mode": "upscale"}, r"field 'mode' is 'upscale'; expected one of"),
        ({"prompt": "a", "mode": "img2img"}, r"field 'mode' is 'img2img', which takes 'image' and no 'mask'"),
        ({"prompt": "a", "mask": "mask.png"}, r"field 'mask' without 'image'"),
        ({"prompt": "a", "image": "missing.png"}, r"field 'image' is '.*missing.png': cannot read the image"),
        ({"prompt": "a", "image": "notes.png"}, r"field 'image' is '.*notes.png': cannot read the image"),
    ],
)  # fmt: skip
def test_a_bad_jsonl_line_is_named_with_its_field(tmp_path, sources, line, message):
    path = _write(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} line 2: {message.removeprefix('line 2: ')}"):
        read_prompt_file(path)


@pytest.mark.parametrize("name, content, message", [("p.csv", "a", r"expected a \.txt .* or \.jsonl file"),
                                                    ("p.txt", "\n \n", "has no prompt")])  # fmt: skip
def test_a_prompt_file_of_another_kind_or_without_prompts_is_refused(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompt_file(tmp_path / name)


def test_every_line_setting_is_a_keyword_of_the_cascade():
    import inspect

    from if_diffusers.batch.prompt_file import SETTINGS

    parameters = inspect.signature(IFCascadePipeline.__call__).parameters
    assert set(SETTINGS) <= set(parameters) and "stage_2_noise_level" in SETTINGS


def test_seeds_derive_from_the_run_seed_and_the_line_number_alone():
    line = PromptLine(5, "a")
    assert line_seed(PromptLine(5, "a", seed=42), 0) == 42
    assert line_seed(line, 0) == line_seed(PromptLine(5, "another prompt"), 0)  # the number, not the text
    seeds = {line_seed(PromptLine(n, "a"), 0) for n in range(1, 101)} | {line_seed(line, 1)}
    assert len(seeds) == 101 and all(0 <= s < 2**32 for s in seeds)


def test_a_lines_steps_replace_both_of_the_runs_for_its_stage():
    run = {"stage_1_timesteps": "smart50", "stage_2_timesteps": "smart27", "stage_1_guidance_scale": 2.0}
    assert merge_settings(run, {"stage_1_num_inference_steps": 4}) == {
        "stage_1_num_inference_steps": 4, "stage_2_timesteps": "smart27", "stage_1_guidance_scale": 2.0}  # fmt: skip
    assert merge_settings(run, {"stage_2_timesteps": "super27", "stage_1_guidance_scale": 3}) == {
        "stage_1_timesteps": "smart50", "stage_2_timesteps": "super27", "stage_1_guidance_scale": 3}  # fmt: skip


# --- a run on one process ----------------------------------------------------------------------------------------


def test_batch_writes_an_imagefolder_dataset_equal_to_generate(cascade_folder, tmp_path, sources):
    """Text-to-image lines (a seed with two images and a negative prompt, batched with a line without one; a line's
    own setting), two img2img lines batched together, and an inpainting line, by 3: `datasets` loads the folder
    with one row per image; each PNG holds its row; an image equals the cascade's own call with its seed and
    settings, made alone, and `generate`'s."""
    PIL.Image.open(sources["image"]).transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "flipped.png")
    rows = [{"prompt": "a red circle", "seed": 11, "num_images": 2, "negative_prompt": "blurry"},
            {"prompt": "a green circle", "seed": 21},
            {"prompt": "a green square", "stage_1_guidance_scale": 3.0},
            {"prompt": "a blue square", "image": "photo.png", "seed": 4},
            {"prompt": "a blue circle", "image": "flipped.png", "seed": 5},
            {"prompt": "a red square", "image": "photo.png", "mask": "mask.png", "seed": 3}]  # fmt: skip
    prompts, out = _write(tmp_path / "prompts.jsonl", rows), tmp_path / "out"
    assert main(["batch", str(prompts), "-o", str(out), "--model", str(cascade_folder), "--device", "cpu",
                 "--batch-size", "3", "--seed", "100", *STEPS]) == 0  # fmt: skip
    names = [f"{line:08d}-{k:03d}.png" for line, k in ((1, 0), (1, 1), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0))]
    assert _images(out) == names and not [p for p in out.iterdir() if p.name.startswith(".")]
    dataset = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert dataset.num_rows == 7 and dataset[0]["image"].size == (256, 256)
    assert dataset["prompt"] == ["a red circle"] * 2 + [row["prompt"] for row in rows[1:]]
    table = {row["file_name"]: row for row in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    assert list(table) == names and [table[n]["seed"] for n in names[:3]] == [11, 12, 21]
    assert table[names[3]]["seed"] == line_seed(PromptLine(3, ""), 100)
    assert table[names[6]]["mode"] == "inpaint" and table[names[6]]["mask_image"] == "mask.png"
    for name in names:
        with PIL.Image.open(out / name) as image:
            assert json.loads(image.text["parameters"]) == table[name]
    assert json.loads(table[names[3]]["settings"]) == {"stage_1_guidance_scale": 3.0,
                                                       **{f"stage_{n}_num_inference_steps": 2 for n in (1, 2, 3)}}  # fmt: skip

    pipeline = IFCascadePipeline.from_pretrained(cascade_folder)
    pipeline.set_progress_bar_config(disable=True)
    photo, flipped, mask = (PIL.Image.open(path) for path in (sources["image"], tmp_path / "flipped.png",
                                                              sources["mask"]))  # fmt: skip
    alone_calls = {names[1]: dict(prompt="a red circle", negative_prompt="blurry", seed=12),
                   names[2]: dict(prompt="a green circle", seed=21),  # batched with the negative prompt's images
                   names[4]: dict(prompt="a blue square", image=photo, seed=4),
                   names[5]: dict(prompt="a blue circle", image=flipped, seed=5),  # batched with the one above
                   names[6]: dict(prompt="a red square", image=photo, mask_image=mask, seed=3)}  # fmt: skip
    for name, call in alone_calls.items():
        seed = call.pop("seed")
        alone = pipeline(**call, generator=torch.Generator().manual_seed(seed), **json.loads(table[name]["settings"]))
        assert np.abs(_pixels(out / name) - np.asarray(alone.images[0], dtype=int)).max() <= 1, name
    assert main(["generate", "a red circle", "--negative-prompt", "blurry", "--seed", "12", "-o",
                 str(tmp_path / "g.png"), "--model", str(cascade_folder), "--device", "cpu", *STEPS]) == 0  # fmt: skip
    assert np.abs(_pixels(out / names[1]) - _pixels(tmp_path / "g.png")).max() <= 1


def test_the_runs_negative_prompt_and_images_per_line_apply_to_lines_without_their_own(cascade_folder, tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, {"prompt": "a", "negative_prompt": "dark",
                                                                          "num_images": 1}])  # fmt: skip
    assert main(["batch", str(prompts), "-o", str(tmp_path / "o"), "--model", str(cascade_folder), "--device", "cpu",
                 "--negative-prompt", "blurry", "--num-images", "2", *STEPS]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "o" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["negative_prompt"]) for r in rows] == [
        ("00000001-000.png", "blurry"), ("00000001-001.png", "blurry"), ("00000002-000.png", "dark")]  # fmt: skip


def test_a_rerun_keeps_complete_images_and_remakes_missing_truncated_or_changed_ones(cascade_folder, tmp_path, capsys):
    prompts, out = _write(tmp_path / "p.txt", ["a red circle", "a green square", "a blue circle"]), tmp_path / "o"
    command = ["batch", str(prompts), "-o", str(out), "--model", str(cascade_folder), "--device", "cpu", *STEPS]
    assert main(command) == 0
    before = {name: (out / name).read_bytes() for name in _images(out)}
    (out / "00000001-000.png").write_bytes(before["00000001-000.png"][:500])  # truncated
    (out / "00000003-000.png").unlink()  # missing
    (out / ".00000002-000.png.123.partial").write_bytes(b"half")  # a killed run's temporary file
    capsys.readouterr()
    assert main(command) == 0
    assert "made 2 images" in capsys.readouterr().out
    assert _images(out) == sorted(before) and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert all((out / name).read_bytes() == data for name, data in before.items())  # remade bit for bit
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 3
    assert main([*command, "--seed", "1"]) == 0  # other seeds: every image is another one
    assert "made 3 images" in capsys.readouterr().out
    assert all((out / name).read_bytes() != data for name, data in before.items())


def test_a_rerun_that_fails_leaves_no_metadata_describing_other_images(cascade_folder, tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    """Once images are to be made, an earlier run's metadata.jsonl goes: a run that then fails (here: the disk, at
    the first image) leaves a folder `datasets` would refuse, rather than one pairing new images with old rows."""
    prompts, out = _write(tmp_path / "p.txt", ["a red circle", "a green square"]), tmp_path / "o"
    command = ["batch", str(prompts), "-o", str(out), "--model", str(cascade_folder), "--device", "cpu", *STEPS]
    assert main(command) == 0 and (out / "metadata.jsonl").is_file()
    _write(prompts, ["a red circle", "a blue square"])  # line 2 changed: its image is to be remade

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_folder, "write_image", full_disk)
    capsys.readouterr()
    assert main(command) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: [Errno 28] No space left on device"
    assert not (out / "metadata.jsonl").exists() and _images(out) == ["00000001-000.png", "00000002-000.png"]


def test_several_processes_take_the_device_type_not_one_device(tmp_path):
    """With N processes each takes cuda:LOCAL_RANK (or the CPU): an indexed --device would put all on one."""
    from types import SimpleNamespace

    from if_diffusers.batch.runner import _prepare

    state = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True, device=torch.device("cpu"))
    args = SimpleNamespace(prompts=str(_write(tmp_path / "p.txt", ["a"])), num_images=1, device="cpu:0", dtype=None,
                           offload="none")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"--device cpu:0: with 2 processes each takes its own device .*pass --device cpu"
    ):
        _prepare(state, args, tmp_path / "out")


def test_bad_lines_and_folders_fail_before_any_image_is_made(cascade_folder, tmp_path, capsys, monkeypatch):
    """A line the cascade refuses (after loading, before the first image) and a folder holding images the file does
    not name (before loading): one error line naming the file, the line and the field; no image written."""
    out = tmp_path / "out"
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "a", "stage_2_noise_level": 1000}])
    assert main(["batch", str(prompts), "-o", str(out), "--model", str(cascade_folder), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(prompts))} line 2: stage 2 .*noise_level=1000: expected an int in "
                        r"\[0, 1000\).*", err), err  # fmt: skip
    assert not out.exists() or not _images(out)

    out.mkdir(exist_ok=True)
    PIL.Image.new("RGB", (4, 4)).save(out / "holiday.png")
    monkeypatch.setattr(IFCascadePipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["batch", str(prompts), "-o", str(out), "--model", str(cascade_folder), "--device", "cpu"]) == 1
    assert "holds 1 image(s) this prompt file does not name (e.g. holiday.png)" in capsys.readouterr().err


def test_batch_options_are_checked_before_loading(tmp_path, capsys, monkeypatch):
    from if_diffusers import generation_options

    monkeypatch.setattr(generation_options, "load_cascade", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = _write(tmp_path / "p.txt", ["a red circle"])
    for arguments, message in ((["--batch-size", "0"], "--batch-size 0: expected an int >= 1"),
                               (["--guidance", "nan"], "--guidance nan: expected a finite number")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["batch", str(prompts), "-o", str(tmp_path / "o"), *arguments])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


# --- several processes ---------------------------------------------------------------------------------------------

DEMO_PROMPTS = [shapes.sample_record(i, 0).caption for i in range(12)]


def _torchrun(processes: int, prompts: Path, out: Path, *arguments: str) -> subprocess.Popen:
    """`python -m torch.distributed.run --nproc_per_node N -m if_diffusers batch ...` on the bundled model (CPU, gloo:
    accelerate's PartialState(cpu=True) joins the processes; `--standalone`: a free port, beside other tests')."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m",
               "if_diffusers", "batch", str(prompts), "-o", str(out), "--device", "cpu", *arguments]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The demo prompts made on one process (this one), one image per call."""
    root = tmp_path_factory.mktemp("one_process")
    prompts = _write(root / "prompts.txt", DEMO_PROMPTS)
    assert main(["batch", str(prompts), "-o", str(root / "out"), "--device", "cpu", *STEPS, "--batch-size", "1"]) == 0
    return root / "out"


def test_a_run_killed_midway_is_completed_by_a_rerun_with_another_batch_size(one_process_run, tmp_path):
    """SIGKILL to one of two processes once the first images are written (torchrun then stops the other); the rerun,
    at batch 3, keeps what is complete, makes the rest, and leaves every image once, decodable, with one metadata row
    each, one progress bar and one "wrote": the images and metadata of one process at batch 1 (within 1 of 255)."""
    import psutil

    prompts = _write(tmp_path / "prompts.txt", DEMO_PROMPTS)
    out = tmp_path / "out"
    run = _torchrun(2, prompts, out, *STEPS, "--batch-size", "1")
    deadline = time.monotonic() + 300
    while not (out.is_dir() and _images(out)) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "if_diffusers" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)
    code, _, err = _finish(run)
    made_before = _images(out)
    assert code != 0 and 1 <= len(made_before) < 12, (code, made_before, err[-2000:])
    assert not (out / "metadata.jsonl").exists()
    kept = {name: (out / name).stat().st_mtime_ns for name in made_before}

    code, stdout, err = _finish(_torchrun(2, prompts, out, *STEPS, "--batch-size", "3"))
    assert code == 0, err
    assert f"made {12 - len(made_before)} images" in stdout and f"kept {len(made_before)} of an earlier run" in stdout
    assert "on 2 process(es)" in stdout and stdout.count("wrote") == 1
    # one bar, on the main process, starting from the kept images
    assert len(re.findall(rf"images:\s+\d+%.* {len(made_before)}/12 \[", err)) == 1, err[-2000:]
    names = _images(out)
    assert names == _images(one_process_run) == [f"{n:08d}-000.png" for n in range(1, 13)]
    for name in names:
        assert np.abs(_pixels(out / name) - _pixels(one_process_run / name)).max() <= 1, name
    assert (out / "metadata.jsonl").read_text() == (one_process_run / "metadata.jsonl").read_text()
    assert sorted(p.name for p in out.iterdir()) == [*names, "metadata.jsonl"]  # nothing half-written left
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [row["file_name"] for row in rows] == names
    for row in rows:
        with PIL.Image.open(out / row["file_name"]) as image:
            image.load()
            assert json.loads(image.text["parameters"]) == row
