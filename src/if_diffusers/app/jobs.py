"""The app's work, without Gradio: the form's values become checked `GenerationRecord`s (one per image), and a job
runs the cascade once for them in a worker thread, streaming its progress and each stage's images as they finish,
and stopping between steps when cancelled (the callback sets diffusers' `_interrupt`).

Stage I candidates are the cascade's stage I of a full call (`last_stage=1`) with one generator per candidate, seeded
`seed + k`; upscaling candidate k is the full call with seed `seed + k`, so its images are `if-diffusers generate
--seed S+k` and `GenerationRecord.replay`'s, to the pixel. It draws the candidate's stage I again (a fraction of the
call: stage II and III dominate) rather than keep a generator's state between requests.

On ZeroGPU (`spaces.GPU`) a job runs in another process: Cancel's event does not reach it there, and a job runs to
its end.
"""

from __future__ import annotations

import dataclasses
import inspect
import queue
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import PIL.Image
import torch

from .. import __version__, demo_cascade
from ..generation_options import MAX_SEED
from ..generation_record import BUNDLED_MODEL, GenerationRecord, pixels_sha256
from ..pipelines.cascade import IFCascadePipeline
from ..pipelines.cascade_inputs import MODE_DEFAULTS
from ..pipelines.output import black_out, check_safety, to_output_images

MAX_CANDIDATES = 4
PAGE_MAX_SEED = 2**53 - 1  # a browser's numbers are exact up to here: the page's seeds stay below it
STAGE_3_DEFAULTS = {name: inspect.signature(IFCascadePipeline.__call__).parameters[name].default
                    for name in ("stage_3_num_inference_steps", "stage_3_guidance_scale", "stage_3_noise_level")}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Form:
    """What the page's advanced settings hold; `None` (a blank field) is the model's default for the mode.

    `stage_N_steps`: a respacing preset ("smart50"), a section string ("10,10,0") or a number of evenly spaced
    steps ("27"); stage III takes a number.
    """

    stage_1_steps: str | None = None
    stage_1_guidance: float | None = None
    stage_2_steps: str | None = None
    stage_2_guidance: float | None = None
    stage_2_noise_level: int | None = None
    stage_3_steps: int | None = None
    stage_3_guidance: float | None = None
    stage_3_noise_level: int | None = None
    strength: float | None = None


@dataclasses.dataclass(frozen=True)
class Progress:
    stage: int
    step: int  # steps done, 0 when the stage starts
    total: int | None  # None where the stage reports no steps (stage III)


@dataclasses.dataclass(frozen=True)
class StageImages:
    stage: int
    images: list[PIL.Image.Image]  # with their records attached (`GenerationRecord.attach`)


@dataclasses.dataclass(frozen=True)
class Finished:
    images: dict[int, list[PIL.Image.Image]]  # by stage, the last stage's the final images; {} when cancelled
    records: list[GenerationRecord]  # of the final images
    cancelled: bool = False


class CascadeJobs:
    """Runs one loaded `IFCascadePipeline` for the app.

    Args:
        pipeline: the cascade, on its device or offloaded.
        models: {"model", "stage_2", "stage_3"} as loaded (recorded with every image).
        device: where the generators live (the models' execution device).
    """

    def __init__(self, pipeline: IFCascadePipeline, models: dict[str, str | None], device: torch.device):
        self.pipeline = pipeline
        self.models = models
        self.device = torch.device(device)
        self.bundled = models.get("model") == BUNDLED_MODEL
        self.dtype = str(pipeline.stage_1_unet.dtype).removeprefix("torch.")
        self._lock = threading.Lock()
        pipeline.set_progress_bar_config(disable=True)

    @property
    def stages(self) -> int:
        return 3 if self.pipeline.has_stage_3 else 2

    def defaults(self, mode: str) -> dict[str, Any]:
        """The cascade arguments a blank form means, explicit: the original IF's for the mode, and for the bundled
        demo model in text-to-image the presets its quality is measured with (as `if-diffusers generate`)."""
        mode_defaults = MODE_DEFAULTS[mode]
        arguments = {"stage_1_timesteps": mode_defaults.stage_1_timesteps,
                     "stage_1_guidance_scale": mode_defaults.stage_1_guidance_scale,
                     "stage_2_timesteps": mode_defaults.stage_2_timesteps,
                     "stage_2_guidance_scale": mode_defaults.stage_2_guidance_scale,
                     "stage_2_noise_level": mode_defaults.stage_2_noise_level}  # fmt: skip
        if self.bundled and mode == "text2img":
            arguments.update(demo_cascade.QUALITY_CALL)
        if mode != "text2img":
            arguments["stage_1_strength"] = 1.0
        if self.pipeline.has_stage_3:
            arguments.update(STAGE_3_DEFAULTS)
        return arguments

    def arguments(self, mode: str, form: Form) -> dict[str, Any]:
        """The form over the mode's defaults; ValueError naming the field for a value of the wrong kind."""
        arguments = self.defaults(mode)
        for stage in (1, 2):
            steps = getattr(form, f"stage_{stage}_steps")
            steps = None if steps is None else str(steps).strip()
            if steps:
                arguments.pop(f"stage_{stage}_timesteps", None)
                arguments.pop(f"stage_{stage}_num_inference_steps", None)
                key = "num_inference_steps" if steps.isdigit() else "timesteps"
                arguments[f"stage_{stage}_{key}"] = int(steps) if steps.isdigit() else steps
            if getattr(form, f"stage_{stage}_guidance") is not None:
                arguments[f"stage_{stage}_guidance_scale"] = float(getattr(form, f"stage_{stage}_guidance"))
        if form.stage_2_noise_level is not None:
            arguments["stage_2_noise_level"] = _whole("stage II noise level", form.stage_2_noise_level)
        stage_3 = {"stage_3_num_inference_steps": form.stage_3_steps, "stage_3_guidance_scale": form.stage_3_guidance,
                   "stage_3_noise_level": form.stage_3_noise_level}  # fmt: skip
        for name, value in stage_3.items():
            if value is None:
                continue
            if not self.pipeline.has_stage_3:
                raise ValueError(
                    f"{name.replace('_', ' ')} is {value}, but this model has no stage III: leave it blank"
                )
            arguments[name] = float(value) if name == "stage_3_guidance_scale" else _whole(name, value)
        if form.strength is not None:
            if mode == "text2img":
                raise ValueError("strength is for image to image and inpainting")
            arguments["stage_1_strength"] = float(form.strength)
        return arguments

    def records(self, mode: str, prompt: str | None, negative_prompt: str | None, seeds: list[int], form: Form,
                last_stage: int | None = None, image: PIL.Image.Image | None = None,
                mask: PIL.Image.Image | None = None) -> list[GenerationRecord]:  # fmt: skip
        """One checked record per seed (the same settings): ValueError, with a message for the page, for anything
        the cascade would refuse, before any model runs."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: describe the image to draw")
        for seed in seeds:
            check_seed(seed)
        if mode != "text2img" and image is None:
            raise ValueError(f"{'image to image' if mode == 'img2img' else 'inpainting'} needs an image: upload one")
        if mode == "inpaint" and (mask is None or not mask.getbbox()):
            raise ValueError("the mask is empty: paint over the part of the image to repaint")
        arguments = self.arguments(mode, form)
        negative_prompt = negative_prompt.strip() if negative_prompt and negative_prompt.strip() else None
        inputs = {} if image is None else {"image": image, "mask_image": mask}
        self.pipeline.check_inputs(prompt, negative_prompt=negative_prompt, last_stage=last_stage, **inputs,
                                   **arguments)  # fmt: skip
        hashes = {"image_sha256": None if image is None else pixels_sha256(image),
                  "mask_sha256": None if mask is None else pixels_sha256(mask)}  # fmt: skip
        return [GenerationRecord(prompt, negative_prompt, seed, mode, arguments, last_stage, self.models, self.dtype,
                                 self.device.type, __version__, **hashes) for seed in seeds]  # fmt: skip

    def run(self, records: list[GenerationRecord], image: PIL.Image.Image | None = None,
            mask: PIL.Image.Image | None = None, cancel: threading.Event | None = None) -> Iterator[Any]:  # fmt: skip
        """Run the cascade once for `records` (same settings, one seed each): yields `Progress` at every step of
        stages I and II (and when stage III starts), `StageImages` as each stage before the last finishes (through
        the safety checker, as the final images), then one `Finished`: the images of every stage, each with its
        record, or `cancelled=True` and none when `cancel` was set. The call's exceptions are raised here."""
        last = records[0].last_stage or self.stages
        events: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()  # `cancel`, or the consumer gone
        stopped = []  # set by the callback when it stopped the call: this job's own record, not the pipeline's

        def on_step(stage_pipeline, step: int, timestep, tensors: dict) -> dict:
            stage = 2 if stage_pipeline.unet is self.pipeline.stage_2_unet else 1
            events.put(Progress(stage, step + 1, stage_pipeline.num_timesteps))
            if step + 1 == stage_pipeline.num_timesteps and stage < last:
                events.put(StageImages(stage, self._previews(tensors["intermediate_images"], records, stage)))
                events.put(Progress(stage + 1, 0, None))
            if stop.is_set() or (cancel is not None and cancel.is_set()):
                stage_pipeline._interrupt = True
                stopped.append(step)
            return tensors

        def work():
            try:
                call = records[0].call_arguments(self.device)
                call["generator"] = [torch.Generator(self.device).manual_seed(r.seed) for r in records]
                call["num_images_per_prompt"] = len(records)
                inputs = {} if image is None else {"image": image}
                if mask is not None:
                    inputs["mask_image"] = mask
                with self._lock:  # one call at a time: the schedulers hold per-call state
                    output = self.pipeline(**call, **inputs, return_intermediates=True, callback_on_step_end=on_step)
                if stopped:
                    events.put(Finished({}, records, cancelled=True))
                    return
                by_stage = {1: output.stage_1_images, 2: output.stage_2_images, last: output.images}
                events.put(Finished({stage: [dataclasses.replace(r, last_stage=stage).attach(i)
                                             for r, i in zip(records, images)]
                                     for stage, images in sorted(by_stage.items()) if images},
                                    [dataclasses.replace(r, last_stage=last) for r in records]))  # fmt: skip
            except BaseException as error:  # handed to the consumer's thread
                events.put(error)

        worker = threading.Thread(target=work, name="if-diffusers-app-job", daemon=True)
        worker.start()
        try:
            yield Progress(1, 0, None)
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:  # also when the consumer closes this generator early (a closed page): stop the call, free the slot
            stop.set()
            worker.join()

    def _previews(self, images: torch.Tensor, records: list[GenerationRecord], stage: int) -> list[PIL.Image.Image]:
        """A finished stage's images `(B, 3, H, W)` in `[-1, 1]`, shown before the call ends: checked by the safety
        checker as the final images are (a flagged one is black)."""
        nsfw, watermarked = check_safety(self.pipeline, images, images.dtype)
        pil = to_output_images(self.pipeline, black_out(images, nsfw, watermarked), "pil", None)
        return [dataclasses.replace(r, last_stage=stage).attach(i) for r, i in zip(records, pil)]


def random_seed(count: int) -> int:
    """A seed whose `count` candidates' seeds (`seed + k`) are all at most `PAGE_MAX_SEED`."""
    return secrets.randbelow(PAGE_MAX_SEED + 2 - count)


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed!r}: expected a whole number in [0, {MAX_SEED}]")


def _whole(name: str, value: float) -> int:
    if float(value) != int(value):
        raise ValueError(f"{name} is {value}: expected a whole number")
    return int(value)
