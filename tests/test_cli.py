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
                                       ["--mask", "m.png"], ["--num-images", "0"]])  # fmt: skip
def test_generate_refuses_inconsistent_options(cascade_folder, arguments):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--model", str(cascade_folder), *arguments])
    assert exit_.value.code == 2


def test_convert_validates_a_converted_folder(converted, capsys):
    _, folder = converted("base")
    assert main(["convert", "--output", str(folder), "--validate"]) == 0
    assert "validated:" in capsys.readouterr().out
