"""The output of `if-diffusers batch`: a Hugging Face `imagefolder` dataset, written so that it can be interrupted and
resumed at any point.

    FOLDER/00000001-000.png  line 1's first image, its row (below) in the PNG text chunk "parameters" as JSON
    FOLDER/00000001-001.png  ...
    FOLDER/metadata.jsonl    one row per image, written last: `datasets.load_dataset("imagefolder", data_dir=FOLDER)`

A row: `file_name`, `line`, `image_index`, `prompt`, `negative_prompt`, `seed`, `mode`, `source_image` and
`mask_image` (the line's files, as it names them) with their `..._sha256`, `settings` (the cascade's keyword
arguments, as JSON), `model`, `stage_2`, `stage_3`, `dtype`, `if_diffusers_version`.

Each image is written to a hidden temporary file beside its name, then renamed: a file under an image's name is
always complete. A rerun keeps an image whose file decodes in full and whose row equals the one it would make now
(the same parameters, model and package version), and remakes the others; hidden temporary files of a killed run
are removed when the next one starts, and so is `metadata.jsonl` when images are to be made (until it is written
again, the folder is not a complete dataset).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.PngImagePlugin

from ..atomic_folder import PARTIAL_SUFFIX, atomic_file
from ..generation_options import check_writable_parent
from ..image_processing import IMAGE_SUFFIXES

METADATA = "metadata.jsonl"
PARAMETERS_KEY = "parameters"  # the PNG text chunk holding the image's row, as JSON


def image_name(line: int, index: int) -> str:
    """`00000001-000.png`: line 1's first image (zero-padded so that names sort in file order, up to 10**8 lines and
    1000 images a line)."""
    return f"{line:08d}-{index:03d}.png"


def check_output_folder(folder: Path, names: set[str]) -> None:
    """`folder` is a folder or can be made, and holds no image that this run would not name (it would enter the
    dataset without a row): ValueError naming the option, before anything loads."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {str(folder)!r} is a file; expected a folder (new, or of an earlier run)")
    check_writable_parent(folder / METADATA, "--output")
    if not folder.is_dir():
        return
    strangers = sorted(p.name for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.name not in names)  # fmt: skip
    if strangers:
        raise ValueError(
            f"--output {str(folder)!r} holds {len(strangers)} image(s) this prompt file does not name (e.g. "
            f"{strangers[0]}): they would enter the dataset without metadata; use a new folder, or remove them"
        )


def remove_leftovers(folder: Path) -> int:
    """Delete the hidden temporary files a killed run left; returns how many."""
    leftovers = [p for p in folder.glob(f".*{PARTIAL_SUFFIX}") if p.is_file()] if folder.is_dir() else []
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def remove_metadata(folder: Path) -> None:
    """Before images are (re)made: an earlier run's rows would describe images that are about to change."""
    (folder / METADATA).unlink(missing_ok=True)


def is_complete(folder: Path, row: dict[str, Any]) -> bool:
    """The image of `row` is there, decodes in full, and was made with exactly `row`'s parameters."""
    try:
        with PIL.Image.open(folder / row["file_name"]) as image:
            image.load()
            return json.loads(image.text.get(PARAMETERS_KEY, "null")) == row
    except (OSError, PIL.UnidentifiedImageError, SyntaxError, ValueError, AttributeError):
        return False


def write_image(folder: Path, row: dict[str, Any], image: PIL.Image.Image) -> Path:
    """Write `image` as `row["file_name"]` with `row` in its PNG text, atomically (`atomic_file`)."""
    path = folder / row["file_name"]
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(row, sort_keys=True))
    with atomic_file(path) as partial:
        image.save(partial, format="PNG", pnginfo=info)
    return path


def write_metadata(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """`metadata.jsonl`, one row per image in file order, written atomically; every image must be complete."""
    missing = [row["file_name"] for row in rows if not (folder / row["file_name"]).is_file()]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} image(s) were not made (e.g. {missing[0]}); run the command again")
    path = folder / METADATA
    with atomic_file(path) as partial:
        partial.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return path
