"""What the page's fields send, read and checked: the advanced settings' text (blank: the model's default), the seed,
the candidate, uploads and the painted mask. Each bad value is a `gr.Error`, a message on the page naming the field.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
import PIL.Image

from ..image_processing import read_image
from .jobs import MAX_CANDIDATES, PAGE_MAX_SEED, Form

CANDIDATE_CHOICES = [str(k) for k in range(1, MAX_CANDIDATES + 1)] + ["all"]


def image_upload(label: str, **kwargs: Any) -> gr.Image:
    """`gr.Image` (file path) whose unreadable upload is a message naming it (gradio's own is a bare "Error"). The
    instance's `preprocess` is wrapped: a subclass would make gradio write a `.pyi` stub beside this file."""
    component = gr.Image(label=label, type="filepath", **kwargs)
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError) as error:
            message = f"the {label.lower()} upload cannot be read as an image ({type(error).__name__})"
            raise gr.Error(message, print_exception=False) from None

    component.preprocess = checked
    return component


ADVANCED_FIELDS = (  # (elem_id, label, the cascade argument whose default a blank field takes)
    ("stage-1-steps", "Stage I steps", "stage_1_timesteps"),
    ("stage-1-guidance", "Stage I guidance", "stage_1_guidance_scale"),
    ("stage-2-steps", "Stage II steps", "stage_2_timesteps"),
    ("stage-2-guidance", "Stage II guidance", "stage_2_guidance_scale"),
    ("stage-2-noise-level", "Stage II noise level, 0-999", "stage_2_noise_level"),
    ("stage-3-steps", "Stage III steps", "stage_3_num_inference_steps"),
    ("stage-3-guidance", "Stage III guidance", "stage_3_guidance_scale"),
    ("stage-3-noise-level", "Stage III noise level, 0-350", "stage_3_noise_level"),
)


def form(stage_1_steps=None, stage_1_guidance=None, stage_2_steps=None, stage_2_guidance=None,
         stage_2_noise_level=None, stage_3_steps=None, stage_3_guidance=None, stage_3_noise_level=None,
         strength=None) -> Form:  # fmt: skip
    """The advanced fields' text (blank: default) as a `Form`; gr.Error naming a field that is not a number."""
    return Form(
        stage_1_steps=blank_is_none(stage_1_steps),
        stage_1_guidance=number("Stage I guidance", stage_1_guidance),
        stage_2_steps=blank_is_none(stage_2_steps),
        stage_2_guidance=number("Stage II guidance", stage_2_guidance),
        stage_2_noise_level=number("Stage II noise level", stage_2_noise_level),
        stage_3_steps=number("Stage III steps", stage_3_steps),
        stage_3_guidance=number("Stage III guidance", stage_3_guidance),
        stage_3_noise_level=number("Stage III noise level", stage_3_noise_level),
        strength=strength,
    )


def blank_is_none(value) -> str | None:
    return None if value is None else str(value).strip() or None


def number(label: str, value) -> float | None:
    text = blank_is_none(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise gr.Error(f"{label} is {text!r}: expected a number, or blank for the default", print_exception=False)
    return number


def count(count) -> int:
    if count is None or float(count) != int(count) or not 1 <= int(count) <= MAX_CANDIDATES:
        raise gr.Error(f"candidates is {count}: expected a whole number from 1 to {MAX_CANDIDATES}",
                       print_exception=False)  # fmt: skip
    return int(count)


def seed(seed) -> int:
    """A whole number in [0, PAGE_MAX_SEED] (the page's numbers are floats, exact up to there)."""
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= PAGE_MAX_SEED:
        raise gr.Error(f"seed is {seed}: expected a whole number from 0 to {PAGE_MAX_SEED}", print_exception=False)
    return seed


def candidate(candidate, count: int) -> int:
    if str(candidate) not in CANDIDATE_CHOICES or int(candidate) > count:
        raise gr.Error(f"candidate is {candidate}: expected 1 to {count} (the candidates drawn) or 'all'",
                       print_exception=False)  # fmt: skip
    return int(candidate) - 1


def read(name: str, path: str | None, mode: str) -> PIL.Image.Image | None:
    if path is None:
        return None
    try:
        return read_image(path, mode, name)
    except ValueError as error:
        raise gr.Error(f"the {name} upload cannot be read as an image: {error}", print_exception=False) from None


def editor_image_and_mask(editor: dict | None) -> tuple[str | None, PIL.Image.Image | None]:
    """The editor's background image file, and the mask painted over it: white where any stroke is."""
    if not editor or editor.get("background") is None:
        return None, None
    layers = [path for path in editor.get("layers") or [] if path]
    background = read("image", editor["background"], "RGB")
    mask = np.zeros((background.height, background.width), dtype=bool)
    for path in layers:
        layer = read("mask", path, "RGBA")
        if layer.size != background.size:
            raise gr.Error(f"the painted mask is {layer.size[0]}x{layer.size[1]}, the image {background.size[0]}x"
                           f"{background.size[1]}: expected the same size", print_exception=False)  # fmt: skip
        mask |= np.asarray(layer)[..., 3] > 0
    return editor["background"], PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L")
