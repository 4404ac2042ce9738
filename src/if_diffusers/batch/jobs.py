"""The images a batch run makes: one `ImageJob` per image of every line, each a pure function of its prompt, its
seed and its settings (never of the batch or the process that makes it), grouped into batches of calls that can
share one cascade call, and checked by the cascade before the first image is made."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from ..generation_options import MAX_SEED, image_seeds
from ..image_processing import read_image
from .image_folder import image_name
from .prompt_file import PromptLine, line_seed

# The columns of a line's `image` and `mask` files (the dataset's own `image` column holds the generated image).
SOURCE_COLUMNS = {"image": "source_image", "mask": "mask_image"}
# Of each stage, the two ways to give its steps: a line's own replaces both of the run's.
STEP_SETTINGS = [(f"stage_{n}_timesteps", f"stage_{n}_num_inference_steps") for n in (1, 2)]


@dataclass(frozen=True)
class RunDefaults:
    """What the command's options give a line that does not say: `seed` (lines without one derive theirs from it
    and their number), `num_images`, `negative_prompt`, the cascade `settings(mode)`, and `record`, the run's
    columns of every row (model ids, dtype, package version)."""

    seed: int
    num_images: int
    negative_prompt: str | None
    settings: Callable[[str], dict[str, Any]]
    record: dict[str, Any]


@dataclass(frozen=True)
class ImageJob:
    """Image `index` of `line`, drawn with its own generator seeded `seed`, by a cascade call with `settings` and
    `negative_prompt`; `row` is its metadata (`image_folder`)."""

    line: PromptLine
    index: int
    seed: int
    negative_prompt: str | None
    settings: dict[str, Any]
    row: dict[str, Any]
    call_key: str  # jobs with equal keys can share one cascade call: the same mode, settings and source-image sizes


def merge_settings(run: dict[str, Any], line: dict[str, Any]) -> dict[str, Any]:
    """The run's cascade settings, replaced by the line's own (a stage's `timesteps` or `num_inference_steps` in the
    line replaces both of the run's, which the cascade would refuse together)."""
    run = dict(run)
    for pair in STEP_SETTINGS:
        if any(name in line for name in pair):
            for name in pair:
                run.pop(name, None)
    return {**run, **line}


def plan_jobs(lines: list[PromptLine], defaults: RunDefaults, prompt_file: Path) -> list[ImageJob]:
    """One `ImageJob` per image, in file order: image k of a line is drawn from the line's seed + k."""
    jobs = []
    for line in lines:
        seed, count = line_seed(line, defaults.seed), line.num_images or defaults.num_images
        if seed + count - 1 > MAX_SEED:
            raise ValueError(f"{prompt_file} line {line.number}: field 'seed' is {seed}; with {count} images, "
                             f"expected at most {MAX_SEED + 1 - count}")  # fmt: skip
        negative = line.negative_prompt if line.negative_prompt is not None else defaults.negative_prompt
        settings = merge_settings(defaults.settings(line.mode), line.settings)
        sources, sizes = {}, []
        for name, column in SOURCE_COLUMNS.items():
            path = line.source(name)
            sources[column] = getattr(line, name)
            sources[f"{column}_sha256"] = None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()
            sizes.append(_size(path))
        key = json.dumps([line.mode, settings, sizes], sort_keys=True)
        for index, image_seed in enumerate(image_seeds(seed, count)):
            row = {"file_name": image_name(line.number, index), "line": line.number, "image_index": index,
                   "prompt": line.prompt, "negative_prompt": negative, "seed": image_seed, "mode": line.mode,
                   **sources, "settings": json.dumps(settings, sort_keys=True), **defaults.record}  # fmt: skip
            # the row as JSON reads it back (tuples as lists), so that a rerun can compare it with an image's own
            jobs.append(ImageJob(line, index, image_seed, negative, settings, json.loads(json.dumps(row)), key))
    return jobs


def batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """`jobs` in batches of up to `batch_size` that share a call key, in file order of their first job."""
    groups: dict[str, list[tuple[int, ImageJob]]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault(job.call_key, []).append((position, job))
    chunks = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    return [[job for _, job in chunk] for chunk in sorted(chunks, key=lambda chunk: chunk[0][0])]


def call_arguments(batch: list[ImageJob]) -> dict[str, Any]:
    """The cascade's arguments for `batch` (one image per prompt; the generators are the caller's): prompts,
    negative prompts ("" stands for none, as the pipelines encode none), source images and masks, settings."""
    lines = [job.line for job in batch]
    negatives = None
    if any(job.negative_prompt is not None for job in batch):
        negatives = [job.negative_prompt or "" for job in batch]
    arguments = dict(prompt=[line.prompt for line in lines], negative_prompt=negatives, **batch[0].settings)
    if "stage_3_prompt" in arguments:  # a line's text, for each of its images
        arguments["stage_3_prompt"] = [arguments["stage_3_prompt"]] * len(batch)
    if lines[0].image is not None:
        arguments["image"] = [read_image(line.source("image"), "RGB", "image") for line in lines]
    if lines[0].mask is not None:
        arguments["mask_image"] = [read_image(line.source("mask"), "L", "mask") for line in lines]
    return arguments


def check_calls(pipeline, jobs: list[ImageJob], prompt_file: Path) -> None:
    """Every distinct call of `jobs` through `pipeline.check_inputs` (an `IFCascadePipeline`; no model runs):
    ValueError naming the prompt file's line for the first the cascade refuses."""
    checked = set()
    for job in jobs:
        key = (job.call_key, job.line.image, job.line.mask, job.negative_prompt is None)
        if key in checked:
            continue
        checked.add(key)
        try:
            pipeline.check_inputs(**call_arguments([job]))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{prompt_file} line {job.line.number}: {error}") from None


def _size(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    with PIL.Image.open(path) as image:
        return image.size
