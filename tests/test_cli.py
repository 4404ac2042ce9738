"""The `if-diffusers` command line: `generate` on a saved tiny cascade (in a subprocess, as a user runs it), its
errors as one line and exit code 1, and `convert` exposing the conversion."""

from __future__ import annotations

import re
import subprocess
import sys

import PIL.Image
import pytest
from test_cascade import _stages

from if_diffusers import IFCascadePipeline
from if_diffusers.cli import main


@pytest.fixture(scope="module")
def cascade_folder(pipeline_components, tiny_upscaler, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "cascade"
    IFCascadePipeline.from_stages(*_stages(pipeline_components, tiny_upscaler)).save_pretrained(folder)
    return folder


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
