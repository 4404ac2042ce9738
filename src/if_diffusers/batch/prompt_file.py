"""The prompt file of `if-diffusers batch`, read and checked in full before any model loads.

Two formats, by suffix:

- `.txt`: one prompt a line;
- `.jsonl`: one JSON object a line: `prompt` (required), and optionally `negative_prompt`, `seed`, `num_images`,
  `mode` ("text2img", "img2img", "inpaint"; by default inferred from `image` and `mask`), `image` and `mask` (image
  files, relative to the prompt file's folder), and per-call settings of `IFCascadePipeline` under their keyword
  names (`SETTINGS`: `stage_1_guidance_scale`, `stage_2_timesteps`, `height`, ...).

Blank lines are skipped; line numbers are the file's own (1-based) and name each line's images. Every error names
the file, the line and the field. Here each field gets its JSON type checked; the cascade checks the values
(`jobs.check_calls`).
"""

from __future__ import annotations

import difflib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..generation_options import MAX_SEED, MODES
from ..image_processing import read_image

FIELDS = ("prompt", "negative_prompt", "seed", "num_images", "mode", "image", "mask")
_NUMBER, _INT, _BOOL, _TEXT = "a number", "an int", "true or false", "a string"
_STEPS = "a preset name, a section string or a list of ints"
# The cascade's per-call settings a line may set, with the JSON type each takes (`IFCascadePipeline.__call__`).
# `max_sequence_length` must be an int: `null` pads a call's prompts to its longest, so an image would depend on the
# prompts it is batched with.
SETTINGS: dict[str, str] = {
    "height": _INT, "width": _INT, "clean_caption": _BOOL, "max_sequence_length": _INT,
    "stage_1_timesteps": _STEPS, "stage_1_num_inference_steps": _INT, "stage_1_guidance_scale": _NUMBER,
    "stage_1_strength": _NUMBER, "stage_2_timesteps": _STEPS, "stage_2_num_inference_steps": _INT,
    "stage_2_guidance_scale": _NUMBER, "stage_2_strength": _NUMBER, "stage_2_noise_level": _INT,
    "stage_2_redraw_augmentation_noise": _BOOL, "stage_2_low_res_consistency_factor": _INT,
    "stage_2_low_res_consistency_late_factor": _INT, "stage_2_low_res_consistency_late_timestep": _INT,
    "stage_3_prompt": _TEXT, "stage_3_num_inference_steps": _INT, "stage_3_guidance_scale": _NUMBER,
    "stage_3_noise_level": _INT, "keep_unmasked_pixels": _BOOL,
}  # fmt: skip
SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class PromptLine:
    """One line of the prompt file: its number, what to draw, and how many images from which seed. `seed` and
    `num_images` are `None` when the line gives none (the run's then apply). `settings` are the line's own cascade
    keyword arguments, which replace the run's."""

    number: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_images: int | None = None
    mode: str = "text2img"
    image: str | None = None  # as the line writes it: relative to `folder`, the prompt file's
    mask: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path(".")

    def source(self, name: str) -> Path | None:
        """The file of the line's `image` or `mask` field."""
        value = getattr(self, name)
        return None if value is None else self.folder / value


def read_prompt_file(path: str | Path) -> list[PromptLine]:
    """Every non-blank line of `path` as a `PromptLine`, each checked (fields, types, image files readable);
    ValueError naming the file, the line and the field for the first bad one, or for a file with no prompt."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"prompt file {str(path)!r}: expected a .txt (one prompt a line) or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the first prompt
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"prompt file {str(path)!r}: cannot read it ({error})") from error
    read = _text_line if path.suffix.lower() == ".txt" else _json_line
    lines = [read(path, number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {str(path)!r} has no prompt")
    return lines


def line_seed(line: PromptLine, run_seed: int) -> int:
    """The line's seed, or one derived from the run's seed and the line's number (in `[0, 2**32)`): the same for a
    line whatever else the file holds, and unrelated between neighbouring lines."""
    if line.seed is not None:
        return line.seed
    return int(np.random.SeedSequence([run_seed, line.number]).generate_state(1)[0])


def _text_line(path: Path, number: int, text: str) -> PromptLine:
    return PromptLine(number, text)


def _json_line(path: Path, number: int, text: str) -> PromptLine:
    where = f"{path} line {number}"
    row = _json_object(where, text)
    prompt = _field(where, row, "prompt", _TEXT, required=True)
    if not prompt.strip():
        raise ValueError(f"{where}: field 'prompt' is empty; expected a non-empty string")
    num_images = _field(where, row, "num_images", _INT)
    if num_images is not None and num_images < 1:
        raise ValueError(f"{where}: field 'num_images' is {num_images}; expected an int >= 1")
    seed = _field(where, row, "seed", _INT)
    if seed is not None and not 0 <= seed <= MAX_SEED + 1 - (num_images or 1):
        raise ValueError(
            f"{where}: field 'seed' is {seed}; expected an int in [0, {MAX_SEED + 1 - (num_images or 1)}]"
        )
    images = {name: _field(where, row, name, "an image file path (relative to the prompt file's folder)")
              for name in ("image", "mask")}  # fmt: skip
    for name, value in images.items():
        if value is not None:
            read_image(path.parent / value, "RGB", f"{where}: field {name!r} is")
    mode = _mode(where, _field(where, row, "mode", f"one of {MODES}"), images)
    settings = {name: _field(where, row, name, SETTINGS[name]) for name in row if name in SETTINGS}  # null: None
    if "max_sequence_length" in row and row["max_sequence_length"] is None:
        raise ValueError(f"{where}: field 'max_sequence_length' is null; expected an int (null would pad each call "
                         "to its longest prompt, so an image would depend on the prompts batched with it)")  # fmt: skip
    negative = _field(where, row, "negative_prompt", _TEXT)
    return PromptLine(number, prompt, negative, seed, num_images, mode, images["image"], images["mask"], settings,
                      path.parent)  # fmt: skip


def _json_object(where: str, text: str) -> dict[str, Any]:
    """The line as a JSON object with known fields only (an unknown one is named, with the closest known)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON {type(row).__name__}; expected an object with a 'prompt'")
    known = FIELDS + tuple(SETTINGS)
    for name in row:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown field {name!r}{hint}; expected {', '.join(FIELDS)} or a cascade "
                             f"setting ({', '.join(SETTINGS)})")  # fmt: skip
    return row


def _mode(where: str, mode: str | None, images: dict[str, str | None]) -> str:
    """The line's mode: as given, which must fit its image fields, or inferred from them."""
    if images["mask"] is not None and images["image"] is None:
        raise ValueError(f"{where}: field 'mask' without 'image'; inpainting needs the image to repaint")
    inferred = "inpaint" if images["mask"] else "img2img" if images["image"] else "text2img"
    if mode is not None and mode not in MODES:
        raise ValueError(f"{where}: field 'mode' is {mode!r}; expected one of {MODES}")
    if mode is not None and mode != inferred:
        needs = {"text2img": "neither 'image' nor 'mask'", "img2img": "'image' and no 'mask'",
                 "inpaint": "'image' and 'mask'"}[mode]  # fmt: skip
        raise ValueError(f"{where}: field 'mode' is {mode!r}, which takes {needs}")
    return inferred


def _field(where: str, row: dict, name: str, expected: str, required: bool = False):
    """`row[name]` if of the JSON type `expected` names (None when absent or null, unless `required`)."""
    value = row.get(name)
    if value is None:
        if required:
            raise ValueError(f"{where}: field {name!r} is missing; expected {expected}")
        return None
    if not _is_type(value, expected):
        raise ValueError(f"{where}: field {name!r} is {json.dumps(value)}; expected {expected}")
    return value


def _is_type(value, expected: str) -> bool:
    if expected == _BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if expected == _INT:
        return isinstance(value, int)
    if expected == _NUMBER:
        return isinstance(value, numbers.Real)
    if expected == _STEPS:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, int) for v in value))
    return isinstance(value, str)
