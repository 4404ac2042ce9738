"""The `if-diffusers` command line: `generate` on a saved tiny cascade (in a subprocess, as a user runs it), its
errors as one line and exit code 1, and `convert` exposing the conversion."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from if_diffusers import IFCascadePipeline
from if_diffusers.cli import main


def test_generate_writes_images_grid_and_intermediates(cascade_folder, tmp_path):
    command = [sys.executable, "-m", "if_diffusers", "generate", "a red circle", "-o", str(tmp_path / "out.png"),
               "--model", str(cascade_folder), "--steps", "2", "--num-images", "2", "--save-intermediates",
               "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    sizes = {"out-0.png": 256, "out-1.png": 256, "out-grid.png": (512, 256), "out-stage1-0.png": 16,
             "out-stage2-1.png": 64}  # fmt: skip
    for name, size in sizes.items():
        with PIL.Image.open(tmp_path / name) as image:
            assert image.size == (size if isinstance(size, tuple) else (size, size)), name
    assert f"wrote {tmp_path / 'out-grid.png'}" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "{missing}"], "error: "),
        (["--model", "{folder}", "--mode", "img2img", "--image", "{not_an_image}"], "--image .*cannot read the image"),
        (["--model", "{folder}", "--stage-3", "x"], "--stage-3 needs --stage-2"),
    ],
)
def test_generate_errors_are_one_line(cascade_folder, tmp_path, capsys, arguments, message):
    (tmp_path / "notes.txt").write_text("not an image")
    paths = {"missing": tmp_path / "no-such-model", "folder": cascade_folder, "not_an_image": tmp_path / "notes.txt"}
    code = main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--device", "cpu",
                 *[a.format(**paths) for a in arguments]])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("arguments", [["--mode", "img2img"], ["--mode", "inpaint", "--image", "a.png"],
                                       ["--mask", "m.png"], ["--num-images", "0"], ["--low-res-consistency", "1"],
                                       ["--low-res-consistency", "-2"]])  # fmt: skip
def test_generate_refuses_inconsistent_options(cascade_folder, arguments):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--model", str(cascade_folder), *arguments])
    assert exit_.value.code == 2


def test_convert_validates_a_converted_folder(converted, capsys):
    _, folder = converted("base")
    assert main(["convert", "--output", str(folder), "--validate"]) == 0
    assert "validated:" in capsys.readouterr().out


@pytest.mark.parametrize("value, factor", [("4", 4), ("0", None)])
def test_generate_passes_the_low_res_consistency_to_stage_2(cascade_folder, tmp_path, monkeypatch, value, factor):
    """--low-res-consistency N is stage II's `low_res_consistency_factor` (0: off), and nothing else is preset for a
    model that is not the bundled one."""
    calls = []

    def record(self, prompt, **kwargs):
        calls.append(kwargs)
        raise ValueError("recorded")

    monkeypatch.setattr(IFCascadePipeline, "__call__", record)
    arguments = ["--model", str(cascade_folder), "--device", "cpu", "--low-res-consistency", value]
    assert main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), *arguments]) == 1
    assert {key: value for key, value in calls[0].items() if key.startswith("stage_")} == {
        "stage_2_low_res_consistency_factor": factor
    }


def test_generate_reports_a_low_res_consistency_that_does_not_divide_stage_2s_size(cascade_folder, tmp_path, capsys):
    """The factor is checked against stage II's output size (64 here) by the pipeline, before any model runs: one
    error line after the loading progress bar, exit code 1."""
    code = main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--device", "cpu", "--model",
                 str(cascade_folder), "--low-res-consistency", "3"])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert re.search(
        r"stage 2.*low_res_consistency_factor=3: expected .*dividing the output size \(64, 64\)", errors[0]
    )
    assert not (tmp_path / "out.png").exists()


@pytest.fixture
def _refuse_loading(monkeypatch):
    """A check that must come before any model loads: loading fails the test."""
    from if_diffusers import generation_options

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generation_options, "load_cascade", refuse)


def _absent_device() -> str:
    """A CUDA device this machine does not have: any on a machine without CUDA, else one past the last."""
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize(
    "output, arguments, message",
    [
        ("result", [], r"--output '.*result': no image file extension ''; expected \.png.*result\.png"),
        ("result.txt", [], r"--output '.*result\.txt': the unknown image file extension '\.txt'"),
        ("a-file/sub/out.png", [], r"--output '.*a-file/sub/out\.png': cannot create a folder there, .*a-file is a file"),
        ("out.png", ["--device", "{absent}"], r"--device cuda(:\d+)?: this machine has (no cuda device|\d+ cuda)"),
        ("out.png", ["--device", "gpu"], r"--device 'gpu': not a device name; expected cpu, cuda"),
    ],
)  # fmt: skip
def test_generate_refuses_an_output_or_device_it_cannot_use_before_loading(
    cascade_folder, tmp_path, capsys, _refuse_loading, output, arguments, message
):
    (tmp_path / "a-file").write_text("a file where a folder would go")
    arguments = [a.format(absent=_absent_device()) for a in arguments]
    code = main(["generate", "a red circle", "-o", str(tmp_path / output), "--model", str(cascade_folder),
                 *arguments])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_generate_refuses_a_guidance_that_is_not_finite_before_loading(cascade_folder, capsys, _refuse_loading,
                                                                        value):  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--model", str(cascade_folder), f"--guidance={value}"])
    assert exit_.value.code == 2
    assert f"--guidance {float(value)}: expected a finite number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device", [["--device", "cpu"], []] if not torch.cuda.is_available() else [["--device", "cpu"]]
)
def test_generate_refuses_offload_without_an_accelerator(cascade_folder, tmp_path, capsys, _refuse_loading, device):
    code = main(["generate", "a red circle", "-o", str(tmp_path / "o.png"), "--model", str(cascade_folder), *device,
                 "--offload", "model"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "error: --offload model moves models" in err


def test_image_k_of_generate_num_images_is_generate_with_seed_plus_k(cascade_folder, tmp_path):
    """One generator per image, seeded --seed + k: the second of two images is the image of --seed + 1 alone."""
    common = ["--model", str(cascade_folder), "--steps", "2", "--device", "cpu"]
    assert main(["generate", "a red circle", "-o", str(tmp_path / "two.png"), "--seed", "5", "--num-images", "2",
                 *common]) == 0  # fmt: skip
    assert main(["generate", "a red circle", "-o", str(tmp_path / "one.png"), "--seed", "6", *common]) == 0
    second, alone = (np.asarray(PIL.Image.open(tmp_path / name), dtype=int) for name in ("two-1.png", "one.png"))
    assert np.abs(second - alone).max() <= 1  # batched arithmetic may round one level apart
    first = np.asarray(PIL.Image.open(tmp_path / "two-0.png"), dtype=int)
    assert np.abs(first - alone).max() > 10
