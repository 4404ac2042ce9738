"""The prompt file of `if-diffusers batch`, read and checked in full before any model loads.

Two formats, by suffix:

- `.txt`: one prompt a line;
- `.jsonl`: one JSON object a line: `prompt` (required), and optionally `negative_prompt`, `seed`, `num_images`,
  `mode` ("text2img", "img2img", "inpaint"; by default inferred from `image` and `mask`), `image` and `mask` (image
  files, relative to the prompt file's folder), and any per-call setting of `IFCascadePipeline` under its keyword
  name (`stage_1_guidance_scale`, `stage_2_timesteps`, `height`, ...; `SETTINGS`).

Blank lines are skipped; line numbers are the file's own (1-based) and name each line's images. Every error names
the file, the line and the field.
"""

from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..generation_options import MAX_SEED
from ..pipelines import IFCascadePipeline

MODES = ("text2img", "img2img", "inpaint")
FIELDS = ("prompt", "negative_prompt", "seed", "num_images", "mode", "image", "mask")
# Arguments of IFCascadePipeline.__call__ that a line does not set as such: its fields above stand for some, the run
# itself owns the others.
_NOT_SETTINGS = {"self", "prompt", "image", "mask_image", "negative_prompt", "num_images_per_prompt", "generator",
                 "prompt_embeds", "negative_prompt_embeds", "output_type", "return_dict", "return_intermediates",
                 "callback_on_step_end", "callback_on_step_end_tensor_inputs"}  # fmt: skip
SETTINGS = tuple(
    name for name in inspect.signature(IFCascadePipeline.__call__).parameters if name not in _NOT_SETTINGS
)
SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class PromptLine:
    """One line of the prompt file: its number, what to draw, and how many images from which seed. `seed` is `None`
    when the line gives none (`line_seed` derives it from the run's seed). `settings` are the line's own cascade
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
        text = path.read_text(encoding="utf-8")
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
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON {type(row).__name__}; expected an object with a 'prompt'")
    for name in row:
        if name not in FIELDS and name not in SETTINGS:
            close = difflib.get_close_matches(name, FIELDS + SETTINGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown field {name!r}{hint}; expected {', '.join(FIELDS)} or a cascade "
                             f"setting ({', '.join(SETTINGS)})")  # fmt: skip
    prompt = _field(where, row, "prompt", str, "a non-empty string", required=True)
    if not prompt.strip():
        raise ValueError(f"{where}: field 'prompt' is empty; expected a non-empty string")
    num_images = _field(where, row, "num_images", int, "an int >= 1")
    if num_images is not None and num_images < 1:
        raise ValueError(f"{where}: field 'num_images' is {num_images}; expected an int >= 1")
    seed = _field(where, row, "seed", int, f"an int in [0, {MAX_SEED}]")
    if seed is not None and not 0 <= seed <= MAX_SEED - (num_images or 1):
        raise ValueError(f"{where}: field 'seed' is {seed}; expected an int in [0, {MAX_SEED - (num_images or 1)}]")
    images = {name: _image_file(path, where, row, name) for name in ("image", "mask")}
    inferred = "inpaint" if images["mask"] else "img2img" if images["image"] else "text2img"
    mode = _field(where, row, "mode", str, f"one of {MODES}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"{where}: field 'mode' is {mode!r}; expected one of {MODES}")
    if mode is not None and mode != inferred:
        needs = {"text2img": "neither 'image' nor 'mask'", "img2img": "'image' and no 'mask'",
                 "inpaint": "'image' and 'mask'"}[mode]  # fmt: skip
        raise ValueError(f"{where}: field 'mode' is {mode!r}, which takes {needs}")
    if images["mask"] is not None and images["image"] is None:
        raise ValueError(f"{where}: field 'mask' without 'image'; inpainting needs the image to repaint")
    negative = _field(where, row, "negative_prompt", str, "a string")
    settings = {name: value for name, value in row.items() if name in SETTINGS}
    return PromptLine(
        number, prompt, negative, seed, num_images, inferred, images["image"], images["mask"], settings, path.parent
    )


def _field(where: str, row: dict, name: str, kind: type, expected: str, required: bool = False):
    value = row.get(name)
    if value is None:
        if required:
            raise ValueError(f"{where}: field {name!r} is missing; expected {expected}")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} is {json.dumps(value)}; expected {expected}")
    return value


def _image_file(path: Path, where: str, row: dict, name: str) -> str | None:
    """The image file a field names, relative to the prompt file's folder; decoded in full here, so that a bad
    file fails before any model loads."""
    value = _field(where, row, name, str, "an image file path (relative to the prompt file's folder)")
    if value is None:
        return None
    file = path.parent / value
    try:
        with PIL.Image.open(file) as image:
            image.load()
    except (OSError, PIL.UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"{where}: field {name!r} is {value!r}: cannot read the image {file} ({error})") from None
    return value
