"""The images a batch run makes: one `ImageJob` per image of every line, each a pure function of its prompt, its
seed and its settings (never of the batch or the process that makes it), grouped into batches of calls that can
share one cascade call, and checked by the cascade before the first image is made."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from .image_folder import image_name
from .prompt_file import PromptLine

# The columns of a line's `image` and `mask` files (the dataset's own `image` column holds the generated image).
SOURCE_COLUMNS = {"image": "source_image", "mask": "mask_image"}
# Of each stage, the two ways to give its steps: a line's own replaces both of the run's.
STEP_SETTINGS = [(f"stage_{n}_timesteps", f"stage_{n}_num_inference_steps") for n in (1, 2)]


@dataclass(frozen=True)
class ImageJob:
    """Image `index` of `line`, drawn with its own generator seeded `seed`, by a cascade call with `settings`;
    `row` is its metadata (`image_folder`)."""

    line: PromptLine
    index: int
    seed: int
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


def plan_jobs(lines: list[PromptLine], seeds: list[int], num_images: list[int], run_settings, record: dict[str, Any]):
    """One `ImageJob` per image: line `lines[i]` makes `num_images[i]` images from seeds `seeds[i]`, `+ 1`, ...;
    `run_settings(mode)` gives the run's cascade settings for a mode, and `record` the run's fields of every row
    (model ids, dtype, package version)."""
    jobs = []
    for line, seed, count in zip(lines, seeds, num_images):
        settings = merge_settings(run_settings(line.mode), line.settings)
        sources, sizes = {}, []
        for name, column in SOURCE_COLUMNS.items():
            path = line.source(name)
            sources[column] = getattr(line, name)
            sources[f"{column}_sha256"] = None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()
            sizes.append(_size(path))
        key = json.dumps([line.mode, settings, sizes], sort_keys=True)
        for index in range(count):
            row = {"file_name": image_name(line.number, index), "line": line.number, "image_index": index,
                   "prompt": line.prompt, "negative_prompt": line.negative_prompt, "seed": seed + index,
                   "mode": line.mode, **sources, "settings": json.dumps(settings, sort_keys=True), **record}  # fmt: skip
            # the row as JSON reads it back (tuples as lists), so that a rerun can compare it with an image's own
            jobs.append(ImageJob(line, index, seed + index, settings, json.loads(json.dumps(row)), key))
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
    if any(line.negative_prompt is not None for line in lines):
        negatives = [line.negative_prompt or "" for line in lines]
    arguments = dict(prompt=[line.prompt for line in lines], negative_prompt=negatives, **batch[0].settings)
    if "stage_3_prompt" in arguments:  # a line's text, for each of its images
        arguments["stage_3_prompt"] = [arguments["stage_3_prompt"]] * len(batch)
    if lines[0].image is not None:
        arguments["image"] = [_open(line.source("image"), "RGB") for line in lines]
    if lines[0].mask is not None:
        arguments["mask_image"] = [_open(line.source("mask"), "L") for line in lines]
    return arguments


def check_calls(pipeline, jobs: list[ImageJob], prompt_file: Path) -> None:
    """Every distinct call of `jobs` through `pipeline.check_inputs` (no model runs): ValueError naming the prompt
    file's line for the first the cascade refuses."""
    checked = set()
    for job in jobs:
        key = (job.call_key, job.line.image, job.line.mask, job.line.negative_prompt is None)
        if key in checked:
            continue
        checked.add(key)
        try:
            pipeline.check_inputs(**call_arguments([job]))
        except ValueError as error:
            raise ValueError(f"{prompt_file} line {job.line.number}: {error}") from None


def _size(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    with PIL.Image.open(path) as image:
        return image.size


def _open(path: Path, mode: str) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        return image.convert(mode)
