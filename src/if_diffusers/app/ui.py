"""The page: a `gradio.Blocks` over `CascadeJobs`. Shared prompt, negative prompt and seed; tabs for generating stage I
candidates and upscaling one, image to image, and inpainting (paint the mask in an image editor); advanced settings
(blank: the model's defaults); a "copy settings" box; Cancel; named API endpoints `/generate`, `/upscale`,
`/img2img`, `/inpaint`, every input but the prompt (and the image) with a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image
import PIL.PngImagePlugin

from ..synthetic import shapes
from . import fields
from .jobs import MAX_CANDIDATES, PAGE_MAX_SEED, CascadeJobs, Form, Progress, StageImages, random_seed

STAGE_NAMES = {1: "stage I", 2: "stage II", 3: "stage III"}
UNCHANGED = (gr.skip(),)  # an output that an update leaves as it is
BUNDLED_EXAMPLES = ["a red circle on a blue background", "a green triangle on a white background",
                    "a small yellow star at the top on a black background"]  # fmt: skip
IF_EXAMPLES = ["a photo of a kangaroo holding a sign that says 'very deep learning'",
               "a watercolour of a lighthouse on a cliff at dawn", "a corgi wearing sunglasses, studio photo"]  # fmt: skip
DOWNLOADS_KEPT_S = 3600  # the app's PNG files for download, as gradio's own cache (`delete_cache`)
LICENCE_NOTE = (
    "DeepFloyd IF's weights are under the [DeepFloyd IF licence](https://huggingface.co/spaces/DeepFloyd/deepfloyd-if-"
    "license) (research use): accept it on each model's Hub page and give this app a token (`HF_TOKEN`) of an account "
    "that has. The x4 upscaler is under the CreativeML Open RAIL++-M licence."
)


def build_app(jobs: CascadeJobs, queue_size: int = 8, concurrency: int = 1) -> gr.Blocks:
    """The app over `jobs` (models already loaded), its queue bounded at `queue_size` waiting requests and
    `concurrency` jobs running at once."""
    cancels: dict[str, threading.Event] = {}
    downloads = Path(tempfile.mkdtemp(prefix="if-diffusers-app-"))
    run = _gpu(jobs.run)

    def stream(session: str, records, image=None, mask=None, progress: gr.Progress | None = None):
        """Run a job for a session; yields the job's events, each step shown on the page's progress bar."""
        cancel = cancels[session] = threading.Event()  # the session's latest job is the one Cancel stops
        try:
            # Closed with this generator: gradio closes a handler whose request was dropped (at a yield: the
            # handlers yield at every step), and the job then stops its call between steps.
            with contextlib.closing(run(records, image, mask, cancel)) as events:
                for event in events:
                    if isinstance(event, Progress) and progress is not None:
                        steps = f": step {event.step}/{event.total}" if event.total else ""
                        progress((event.step, event.total) if event.total else None,
                                 desc=f"{STAGE_NAMES[event.stage]}{steps}")  # fmt: skip
                    yield event
        except gr.Error:
            raise
        except Exception as error:  # to the page as a message, not a trace; the worker lives on
            raise gr.Error(f"{type(error).__name__}: {error}", print_exception=True) from None
        finally:
            if cancels.get(session) is cancel:
                del cancels[session]

    def make_records(mode, prompt, negative, seeds, form: Form, last_stage=None, image=None, mask=None):
        try:
            return jobs.records(mode, prompt, negative, seeds, form, last_stage, image, mask)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error), print_exception=False) from None

    # The handlers' parameter names are the API's (`Client.predict(..., api_name="/generate")`).
    def generate(prompt: str, negative_prompt: str = "", candidates: int = MAX_CANDIDATES, seed: int = 0,
                 randomize_seed: bool = True, stage_1_steps: str = "", stage_1_guidance: str = "",
                 request: gr.Request = None, progress=gr.Progress()):  # fmt: skip
        count = fields.count(candidates)
        seed = random_seed(count) if randomize_seed else fields.seed(seed)
        form = fields.form(stage_1_steps, stage_1_guidance)
        records = make_records("text2img", prompt, negative_prompt, [seed + k for k in range(count)], form, 1)
        # what the candidates on show were drawn with, for Upscale (set once they are on show)
        drawn = {"prompt": prompt, "negative": negative_prompt, "count": count, "seed": seed,
                 "stage_1": [stage_1_steps, stage_1_guidance]}  # fmt: skip
        yield [], "", seed, "Drawing stage I candidates...", None
        with contextlib.closing(stream(_session(request), records, progress=progress)) as events:
            for event in events:
                if isinstance(event, Progress):
                    yield UNCHANGED * 5  # a step: gradio may close this handler here
                    continue
                if event.cancelled:
                    yield [], "", seed, "Cancelled.", None
                    return
                images = event.images[1]
                yield ([(image, f"candidate {k + 1} (seed {r.seed})") for k, (image, r) in
                        enumerate(zip(images, records))], _settings_text(records), seed,
                       f"{len(images)} candidate(s): choose one and click Upscale.", drawn)  # fmt: skip

    def upscale(prompt: str, negative_prompt: str = "", candidates: int = MAX_CANDIDATES, seed: int = 0,
                candidate: str = "1", stage_1_steps: str = "", stage_1_guidance: str = "",
                stage_2_steps: str = "", stage_2_guidance: str = "", stage_2_noise_level: str = "",
                stage_3_steps: str = "", stage_3_guidance: str = "",
                stage_3_noise_level: str = "", request: gr.Request = None,
                progress=gr.Progress()):  # fmt: skip
        count, seed = fields.count(candidates), fields.seed(seed)
        chosen = list(range(count)) if candidate == "all" else [fields.candidate(candidate, count)]
        form = fields.form(stage_1_steps, stage_1_guidance, stage_2_steps, stage_2_guidance, stage_2_noise_level,
                           stage_3_steps, stage_3_guidance, stage_3_noise_level)  # fmt: skip
        records = make_records("text2img", prompt, negative_prompt, [seed + k for k in chosen], form)
        job = stream(_session(request), records, progress=progress)
        yield from _run_to_gallery(job, records, chosen, downloads)

    def upscale_shown(drawn: dict | None, candidate: str, *later_stages: str, request: gr.Request = None,
                      progress=gr.Progress()):  # fmt: skip
        """The page's Upscale: the candidates on show, with what they were drawn with (whatever the form says now)."""
        if not drawn:
            raise gr.Error("no candidates to upscale: click Generate first", print_exception=False)
        yield from upscale(drawn["prompt"], drawn["negative"], drawn["count"], drawn["seed"], candidate,
                           *drawn["stage_1"], *later_stages, request=request, progress=progress)  # fmt: skip

    def img2img(prompt: str, image: str, negative_prompt: str = "", strength: float = 1.0, seed: int = 0,
                randomize_seed: bool = True, stage_1_steps: str = "", stage_1_guidance: str = "",
                stage_2_steps: str = "", stage_2_guidance: str = "", stage_2_noise_level: str = "",
                stage_3_steps: str = "", stage_3_guidance: str = "",
                stage_3_noise_level: str = "", request: gr.Request = None, progress=gr.Progress()):  # fmt: skip
        source = fields.read("image", image, "RGB")
        seed = random_seed(1) if randomize_seed else fields.seed(seed)
        form = fields.form(stage_1_steps, stage_1_guidance, stage_2_steps, stage_2_guidance, stage_2_noise_level,
                           stage_3_steps, stage_3_guidance, stage_3_noise_level, strength)  # fmt: skip
        records = make_records("img2img", prompt, negative_prompt, [seed], form, image=source)
        job = stream(_session(request), records, source, progress=progress)
        yield from _run_to_gallery(job, records, [0], downloads, seed, {"source": source})

    def inpaint(prompt: str, image: str, mask: str, negative_prompt: str = "", strength: float = 1.0, seed: int = 0,
                randomize_seed: bool = True, stage_1_steps: str = "", stage_1_guidance: str = "",
                stage_2_steps: str = "", stage_2_guidance: str = "", stage_2_noise_level: str = "",
                stage_3_steps: str = "", stage_3_guidance: str = "",
                stage_3_noise_level: str = "", request: gr.Request = None, progress=gr.Progress()):  # fmt: skip
        source = fields.read("image", image, "RGB")
        mask = mask if isinstance(mask, PIL.Image.Image) else fields.read("mask", mask, "L")
        if mask is not None and source is not None and mask.size != source.size:
            raise gr.Error(f"the mask is {mask.size[0]}x{mask.size[1]}, the image {source.size[0]}x{source.size[1]}: "
                           "expected the same size", print_exception=False)  # fmt: skip
        seed = random_seed(1) if randomize_seed else fields.seed(seed)
        form = fields.form(stage_1_steps, stage_1_guidance, stage_2_steps, stage_2_guidance, stage_2_noise_level,
                           stage_3_steps, stage_3_guidance, stage_3_noise_level, strength)  # fmt: skip
        records = make_records("inpaint", prompt, negative_prompt, [seed], form, image=source, mask=mask)
        job = stream(_session(request), records, source, mask, progress=progress)
        yield from _run_to_gallery(job, records, [0], downloads, seed, {"source": source, "mask": mask})

    def inpaint_editor(prompt, editor, negative_prompt, strength, seed, randomize_seed, *advanced,
                       request: gr.Request = None, progress=gr.Progress()):  # fmt: skip
        image, mask = fields.editor_image_and_mask(editor)
        yield from inpaint(prompt, image, mask, negative_prompt, strength, seed, randomize_seed, *advanced,
                           request=request, progress=progress)  # fmt: skip

    def cancel(request: gr.Request) -> str:
        event = cancels.get(_session(request))
        if event is None:
            return "Nothing to cancel."
        event.set()
        return "Cancelling after the current step..."

    examples = BUNDLED_EXAMPLES if jobs.bundled else IF_EXAMPLES
    with gr.Blocks(title="DeepFloyd IF", delete_cache=(3600, 3600)) as app:
        gr.Markdown(_header(jobs))
        prompt = gr.Textbox(label="Prompt", placeholder=examples[0], elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative-prompt")
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=PAGE_MAX_SEED, elem_id="seed")
            randomize = gr.Checkbox(label="Randomise seed", value=True, elem_id="randomize")
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        status = gr.Markdown(label="status", elem_id="status")
        settings = gr.Code(label="settings", language="json", elem_id="settings", render=False)  # shown below
        drawn = gr.State(None)  # what the candidates on show were drawn with (generate's), for Upscale
        with gr.Tabs():
            with gr.Tab("Generate and upscale", id="generate"):
                count = gr.Slider(1, MAX_CANDIDATES, value=MAX_CANDIDATES, step=1, label="Candidates",
                                  elem_id="candidates")  # fmt: skip
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                candidates = gr.Gallery(label="Stage I candidates (click one to choose it)", columns=MAX_CANDIDATES,
                                        format="png", elem_id="candidates-gallery", buttons=["download", "fullscreen"])  # fmt: skip
                with gr.Row():
                    candidate = gr.Dropdown(fields.CANDIDATE_CHOICES, value="1", label="Candidate to upscale",
                                            elem_id="candidate")  # fmt: skip
                    upscale_button = gr.Button("Upscale", variant="primary", elem_id="upscale")
                    api_upscale = gr.Button(visible=False)  # /upscale: every setting explicit, for API clients
                upscaled = gr.Gallery(label="Upscaled", columns=2, format="png", elem_id="upscaled",
                                      buttons=["download", "fullscreen"])  # fmt: skip
                upscaled_files = gr.File(label="Download (PNG with its settings)", file_count="multiple",
                                         elem_id="upscaled-files")  # fmt: skip
                gr.Examples([[text, "", MAX_CANDIDATES, 0, False] for text in examples],
                            [prompt, negative, count, seed, randomize], [candidates, settings, seed, status, drawn], generate,
                            cache_examples=True, cache_mode="lazy", label="Examples (cached once run)")  # fmt: skip
            with gr.Tab("Image to image", id="img2img"):
                source = fields.image_upload("Image", elem_id="img2img-image")
                img2img_strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength (1: the whole preset)")
                img2img_button = gr.Button("Restyle", variant="primary", elem_id="img2img")
                img2img_out = gr.Gallery(label="Result", columns=3, format="png", elem_id="img2img-out",
                                         buttons=["download", "fullscreen"])  # fmt: skip
                img2img_files = gr.File(label="Download", file_count="multiple", elem_id="img2img-files")
            with gr.Tab("Inpainting", id="inpaint"):
                editor = gr.ImageEditor(label="Image: paint over what to repaint", type="filepath", layers=False,
                                        brush=gr.Brush(colors=["#ffffff"], default_size=8), format="png",
                                        elem_id="inpaint-editor")  # fmt: skip
                inpaint_strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength")
                inpaint_button = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
                inpaint_out = gr.Gallery(label="Result", columns=3, format="png", elem_id="inpaint-out",
                                         buttons=["download", "fullscreen"])  # fmt: skip
                inpaint_files = gr.File(label="Download", file_count="multiple", elem_id="inpaint-files")
                api_image = fields.image_upload("image", visible=False)  # /inpaint's, for API clients
                api_mask = fields.image_upload("mask", visible=False)
                api_inpaint = gr.Button(visible=False)
        with gr.Accordion("Advanced settings (blank: the model's defaults, shown for text to image)", open=False):
            advanced = _advanced_fields(jobs)
        gr.Markdown(
            "**Settings** of the images on show: save as a .json file and run `if-diffusers generate "
            "--settings FILE` (or pass a downloaded PNG, which carries them), or in Python "
            "`GenerationRecord.from_json(text).replay(pipe)`: the same pixels."
        )
        settings.render()  # fmt: skip

        upscale_outputs = [upscaled, upscaled_files, settings, status]
        one_job = {"concurrency_id": "cascade", "concurrency_limit": concurrency}  # every event that runs the models
        generate_button.click(generate, [prompt, negative, count, seed, randomize, *advanced[:2]],
                              [candidates, settings, seed, status, drawn], api_name="generate", **one_job)  # fmt: skip
        candidates.select(_chosen, None, candidate, api_visibility="private")
        upscale_button.click(upscale_shown, [drawn, candidate, *advanced[2:]], upscale_outputs,
                             api_visibility="private", **one_job)  # fmt: skip
        api_upscale.click(upscale, [prompt, negative, count, seed, candidate, *advanced], upscale_outputs,
                          api_name="upscale", **one_job)  # fmt: skip
        img2img_button.click(img2img, [prompt, source, negative, img2img_strength, seed, randomize, *advanced],
                             [img2img_out, img2img_files, settings, status], api_name="img2img", **one_job)  # fmt: skip
        inpaint_button.click(inpaint_editor, [prompt, editor, negative, inpaint_strength, seed, randomize, *advanced],
                             [inpaint_out, inpaint_files, settings, status], api_visibility="private", **one_job)  # fmt: skip
        api_inpaint.click(inpaint, [prompt, api_image, api_mask, negative, inpaint_strength, seed, randomize,
                                    *advanced], [inpaint_out, inpaint_files, settings, status], api_name="inpaint", **one_job)  # fmt: skip
        cancel_button.click(cancel, None, status, queue=False, api_name="cancel")
        app.unload(cancel)  # a closed page stops its job
    app.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return app


def _run_to_gallery(events: Iterator[Any], records, chosen: list[int], downloads: Path, seed: int | None = None,
                    inputs: dict[str, PIL.Image.Image] | None = None) -> Iterator[tuple]:  # fmt: skip
    """A job's events as (gallery, files, settings, status) updates: each stage's images as it finishes. The files:
    the final images, then the `inputs` a replay needs (img2img's source, inpainting's mask)."""
    shown: list[tuple[PIL.Image.Image, str]] = []
    yield [], [], "", "Running..."
    with contextlib.closing(events):
        for event in events:
            if isinstance(event, Progress):
                yield UNCHANGED * 4  # a step: gradio may close this handler here
            elif isinstance(event, StageImages):
                shown += [(image, f"candidate {k + 1}, {STAGE_NAMES[event.stage]}")
                          for k, image in zip(chosen, event.images)]  # fmt: skip
                yield shown, [], "", f"{STAGE_NAMES[event.stage]} done; {STAGE_NAMES[event.stage + 1]} running..."
            elif event.cancelled:
                yield shown, [], "", "Cancelled."
            else:
                shown = [(image, f"candidate {k + 1}, {STAGE_NAMES[stage]}") for stage, images in event.images.items()
                         for k, image in zip(chosen, images)]  # fmt: skip
                files = _png_files(event.images[max(event.images)], chosen, downloads, inputs or {})
                note = "" if seed is None else f" (seed {seed})"
                replay = f", and the {' and '.join(inputs)} to make it again" if inputs else ""
                status = f"Done{note}: {len(chosen)} image(s); the PNGs carry their settings{replay}."
                yield shown, files, _settings_text(event.records), status


def _png_files(images: list[PIL.Image.Image], chosen: list[int], folder: Path,
               inputs: dict[str, PIL.Image.Image]) -> list[str]:  # fmt: skip
    """The final images as PNG files with their records in the text chunks (the download links), in `folder`,
    where files older than `DOWNLOADS_KEPT_S` go (gradio serves its own copies)."""
    now = time.time()
    for old in folder.glob("*/*.png"):
        if now - old.stat().st_mtime > DOWNLOADS_KEPT_S:
            old.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                old.parent.rmdir()
    job = Path(tempfile.mkdtemp(dir=folder))
    paths = []
    for k, image in zip(chosen, images):
        path = job / f"if-candidate-{k + 1}-{image.width}x{image.height}.png"
        pnginfo = PIL.PngImagePlugin.PngInfo()
        for key, value in image.info.items():
            if isinstance(value, str):
                pnginfo.add_text(key, value)
        image.save(path, pnginfo=pnginfo)
        paths.append(str(path))
    for name, image in inputs.items():
        path = job / f"{name}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def _advanced_fields(jobs: CascadeJobs) -> list[gr.components.Component]:
    """Text fields (a browser sends an empty number field as 0): blank is the model's default, shown as the hint;
    steps take a preset (smart27, smart50, smart100, smart185, fast27, super27, ...), sections (10,10,0) or a
    number."""
    defaults = jobs.defaults("text2img")
    boxes = []
    rows = fields.ADVANCED_FIELDS
    for row in (rows[:2], rows[2:5], rows[5:]):
        with gr.Row(visible=jobs.pipeline.has_stage_3 or row[0][0] != "stage-3-steps"):
            for elem_id, label, argument in row:
                default = defaults.get(argument, defaults.get(argument.replace("timesteps", "num_inference_steps")))
                boxes.append(gr.Textbox(label=label, value="", placeholder=f"default: {default}", elem_id=elem_id))
    return boxes


def _header(jobs: CascadeJobs) -> str:
    models = ", ".join(f"`{v}`" for v in jobs.models.values() if v)
    if jobs.bundled:
        return (f"# DeepFloyd IF, with if-diffusers\nServing the small demo cascade bundled in the package ({models}: "
                f"32x32 shapes upscaled to 128x128, trained on captions of these words only: "
                f"*{' '.join(shapes.caption_vocabulary())}*). Serve real IF with `if-diffusers serve --model "
                f"DeepFloyd/IF-I-XL-v1.0 --stage-2 DeepFloyd/IF-II-L-v1.0 --stage-3 "
                f"stabilityai/stable-diffusion-x4-upscaler`.\n\n{LICENCE_NOTE}")  # fmt: skip
    return f"# DeepFloyd IF, with if-diffusers\nModels: {models}.\n\n{LICENCE_NOTE}"


def _chosen(selection: gr.SelectData) -> str:
    return str(selection.index + 1)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _settings_text(records) -> str:
    """The records as the settings box shows them: one JSON object, or a list of them."""
    fields = [dataclasses.asdict(r) for r in records]
    return json.dumps(fields if len(fields) > 1 else fields[0], indent=1, sort_keys=True)


def _gpu(function: Callable) -> Callable:
    """`spaces.GPU(function)` on Hugging Face's ZeroGPU Spaces (where the `spaces` package is), else `function`."""
    try:
        import spaces
    except ImportError:
        return function
    return spaces.GPU(duration=120)(function)
