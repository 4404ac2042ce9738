"""The app (`if_diffusers.app`) served on localhost over the bundled demo cascade, called through `gradio_client` as
API users call it: every endpoint's images equal the Python API's (and the command line's replay of the PNG), bad
input comes back as a message, Cancel stops a job between steps and frees the slot, and a burst of 8 clients against
a queue of 4 either completes each with its own image or refuses it, without leaking memory."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import threading
import time
from pathlib import Path

import gradio_client  # the [app] extra, part of [test]
import numpy as np
import PIL.Image
import psutil
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.utils import QueueError

from if_diffusers.app import choose_offload
from if_diffusers.app.jobs import Finished, Form, Progress, StageImages
from if_diffusers.cli import main
from if_diffusers.generation_record import BUNDLED_MODEL, GenerationRecord

PROMPT = "a red circle on a blue background"
FAST = {"stage_1_steps": "5", "stage_2_steps": "4"}  # few steps: every call here takes about a second
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(demo_app):
    return Client(demo_app.url, verbose=False)


def _pixels(path_or_item) -> np.ndarray:
    path = path_or_item["image"] if isinstance(path_or_item, dict) else path_or_item
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _python_api(pipeline, seeds, **call):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipeline(PROMPT, num_images_per_prompt=len(seeds), generator=generators, **call).images


def test_generate_then_upscale_equal_the_python_api_and_the_command_lines_replay(demo_app, client, tmp_path):
    candidates, settings, seed, status = client.predict(PROMPT, "", 2, 11, False, FAST["stage_1_steps"], None,
                                                        api_name="/generate")  # fmt: skip
    assert seed == 11 and "2 candidate(s)" in status and len(json.loads(settings)) == 2
    stage_1 = dict(stage_1_num_inference_steps=5, stage_1_guidance_scale=2.0)
    expected = _python_api(demo_app.pipeline, [11, 12], last_stage=1, **stage_1)
    assert [_pixels(c).shape for c in candidates] == [(32, 32, 3)] * 2
    for got, want in zip(candidates, expected):
        np.testing.assert_array_equal(_pixels(got), np.asarray(want))

    gallery, files, settings, status = client.predict(PROMPT, "", 2, 11, "2", "5", None, "4", None, None, None, None,
                                                      None, api_name="/upscale")  # fmt: skip
    assert [_pixels(g).shape for g in gallery] == [(32, 32, 3), (128, 128, 3)] and len(files) == 1
    full = _python_api(demo_app.pipeline, [12], **stage_1, stage_2_num_inference_steps=4, stage_2_guidance_scale=6.0,
                       stage_2_noise_level=100, stage_2_low_res_consistency_factor=4)[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(files[0]), np.asarray(full))
    np.testing.assert_array_equal(_pixels(gallery[0]), _pixels(candidates[1]))  # the chosen candidate, again
    record = GenerationRecord.from_png(files[0])
    assert record == GenerationRecord.from_json(settings) and record.seed == 12 and record.last_stage == 2
    assert record.models["model"] == BUNDLED_MODEL and record.package_version
    # the command line makes it again from the PNG alone, and from the copied settings
    (tmp_path / "settings.json").write_text(settings)
    for source in (files[0], tmp_path / "settings.json"):
        assert main(["generate", "--settings", str(source), "-o", str(tmp_path / "again.png"), "--device", "cpu"]) == 0
        np.testing.assert_array_equal(_pixels(tmp_path / "again.png"), np.asarray(full))


def test_every_input_but_the_prompt_has_a_default(demo_app, client):
    """`Client(url).predict(prompt, api_name="/generate")` as README shows it: 4 candidates at the model's defaults
    (the demo's measured presets) with a random seed."""
    candidates, settings, seed, _ = client.predict(PROMPT, api_name="/generate")
    records = [GenerationRecord.from_json(json.dumps(r)) for r in json.loads(settings)]
    assert len(candidates) == 4 and [r.seed for r in records] == [seed + k for k in range(4)]
    assert records[0].arguments["stage_1_timesteps"] == "smart50"
    # README's snippet: by name
    upscaled, files, settings, _ = client.predict(PROMPT, seed=seed, candidate="2", stage_2_steps="4",
                                                  api_name="/upscale")  # fmt: skip
    assert GenerationRecord.from_png(files[0]).seed == seed + 1 and _pixels(files[0]).shape == (128, 128, 3)


def _source_image(tmp_path) -> Path:
    from if_diffusers.synthetic import shapes

    path = tmp_path / "source.png"
    shapes.render(shapes.sample_record(3), 96).save(path)
    return path


def test_img2img_and_inpaint_equal_the_python_api(demo_app, client, tmp_path):
    source = _source_image(tmp_path)
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[20:60, 30:80] = 255
    PIL.Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    image = PIL.Image.open(source).convert("RGB")
    steps = dict(stage_1_steps="10,0", stage_2_steps="3")
    call = dict(stage_1_timesteps="10,0", stage_2_num_inference_steps=3, stage_2_guidance_scale=4.0)

    gallery, files, settings, _ = client.predict(PROMPT, handle_file(source), "", 0.8, 5, False, steps["stage_1_steps"],
                                                 None, steps["stage_2_steps"], api_name="/img2img")  # fmt: skip
    expected = _python_api(demo_app.pipeline, [5], image=image, stage_1_strength=0.8, stage_1_guidance_scale=10.0,
                           stage_2_noise_level=250, **call)[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(files[0]), np.asarray(expected))
    assert GenerationRecord.from_png(files[0]).mode == "img2img"

    gallery, files, settings, _ = client.predict(PROMPT, handle_file(source), handle_file(tmp_path / "mask.png"), "",
                                                 1.0, 6, False, steps["stage_1_steps"], None, steps["stage_2_steps"],
                                                 api_name="/inpaint")  # fmt: skip
    mask_image = PIL.Image.open(tmp_path / "mask.png")
    expected = _python_api(demo_app.pipeline, [6], image=image, mask_image=mask_image, stage_1_guidance_scale=7.0,
                           stage_2_noise_level=0, stage_1_strength=1.0, **call)[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(files[0]), np.asarray(expected))
    assert main(["generate", "--settings", files[0], "--image", str(source), "--mask", str(tmp_path / "mask.png"),
                 "-o", str(tmp_path / "again.png"), "--device", "cpu"]) == 0  # fmt: skip
    np.testing.assert_array_equal(_pixels(tmp_path / "again.png"), np.asarray(expected))
    assert main(["generate", "--settings", files[0], "--image", str(source), "--mask", str(source),
                 "-o", str(tmp_path / "other.png")]) == 1  # fmt: skip


@pytest.mark.parametrize(
    "endpoint, arguments, message",
    [
        ("/generate", ("",), "the prompt is empty"),
        ("/generate", (PROMPT, "", 5), "Value 5 is greater than maximum value 4"),  # gradio checks the slider
        ("/generate", (PROMPT, "", 1, -3, False), "Value -3 is less than minimum value 0"),
        ("/generate", (PROMPT, "", 1, 0, False, "smart1000"), "timesteps='smart1000' is not a preset"),
        ("/generate", (PROMPT, "", 1, 0, False, "0"), "num_inference_steps=0"),
        ("/upscale", (PROMPT, "", 2, 0, "3"), "candidate is 3: expected 1 to 2"),
        ("/upscale", (PROMPT, "", 1, 0, "1", "", None, "", None, 1000), "noise_level=1000"),
        ("/upscale", (PROMPT, "", 1, 0, "1", "", None, "", None, None, 20), "this model has no stage III"),
        ("/img2img", (PROMPT, "NOT_AN_IMAGE"), "the image upload cannot be read as an image"),
        ("/inpaint", (PROMPT, "SOURCE", "SMALL_MASK"), "the mask is 32x32, the image 96x96: expected the same size"),
        ("/inpaint", (PROMPT, "SOURCE", "EMPTY_MASK"), "the mask is empty"),
    ],
)  # fmt: skip
def test_bad_input_is_a_message_not_a_trace(demo_app, client, tmp_path, endpoint, arguments, message):
    files = {"SOURCE": _source_image(tmp_path), "NOT_AN_IMAGE": tmp_path / "notes.png",
             "SMALL_MASK": tmp_path / "small.png", "EMPTY_MASK": tmp_path / "empty.png"}  # fmt: skip
    files["NOT_AN_IMAGE"].write_bytes(b"not a png")
    PIL.Image.new("L", (32, 32), 255).save(files["SMALL_MASK"])
    PIL.Image.new("L", (96, 96), 0).save(files["EMPTY_MASK"])
    arguments = [handle_file(files[a]) if isinstance(a, str) and a in files else a for a in arguments]
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(*arguments, api_name=endpoint)
    # the worker lives on
    assert len(client.predict(PROMPT, "", 1, 0, False, "2", None, api_name="/generate")[0]) == 1


def test_cancel_stops_the_job_between_steps_and_frees_the_slot(demo_app):
    client = Client(demo_app.url, verbose=False)
    job = client.submit(PROMPT, "", 4, 0, False, "400", None, api_name="/generate")  # minutes if not stopped
    deadline = time.monotonic() + 60
    while not job.status().progress_data:
        assert time.monotonic() < deadline, "the job never reported progress"
        time.sleep(0.05)
    started = time.monotonic()
    assert "Cancelling" in client.predict(api_name="/cancel")
    candidates, _, _, status = job.result(timeout=60)
    assert candidates == [] and status == "Cancelled." and time.monotonic() - started < 10
    assert len(client.predict(PROMPT, "", 1, 0, False, "2", None, api_name="/generate")[0]) == 1


def test_jobs_stream_progress_and_each_stage_as_it_finishes(demo_app):
    jobs = demo_app.jobs
    records = jobs.records("text2img", PROMPT, None, [3, 4], Form("3", None, "2"))
    events = list(jobs.run(records))
    progress = [(e.stage, e.step, e.total) for e in events if isinstance(e, Progress)]
    assert progress == [(1, 0, None), (1, 1, 3), (1, 2, 3), (1, 3, 3), (2, 0, None), (2, 1, 2), (2, 2, 2)]
    previews = [e for e in events if isinstance(e, StageImages)]
    assert [(p.stage, len(p.images), p.images[0].size) for p in previews] == [(1, 2, (32, 32))]
    finished = events[-1]
    assert isinstance(finished, Finished) and not finished.cancelled
    for preview, final in zip(previews[0].images, finished.images[1]):  # the preview is the stage I image
        np.testing.assert_array_equal(np.asarray(preview), np.asarray(final))
    assert [GenerationRecord.from_json(i.info["if_diffusers"]).last_stage for i in finished.images[2]] == [2, 2]


def test_a_burst_of_8_clients_against_a_queue_of_4(demo_app):
    """8 clients at once, one worker, 4 waiting places: each gets its own image or the queue-full refusal; none
    hangs, and resident memory comes back to within 10% of before."""
    process = psutil.Process()
    clients = [Client(demo_app.url, verbose=False) for _ in range(8)]
    gc.collect()
    before = process.memory_info().rss
    barrier = threading.Barrier(8)

    def call(seed: int):
        barrier.wait()
        try:
            return clients[seed].predict(PROMPT, "", 1, 100 + seed, False, "30", None, api_name="/generate")
        except QueueError:  # "Queue is full! Please try again."
            return "refused"

    pool = concurrent.futures.ThreadPoolExecutor(8)
    futures = [pool.submit(call, seed) for seed in range(8)]
    finished, hanging = concurrent.futures.wait(futures, timeout=120)
    pool.shutdown(wait=False)
    assert not hanging, f"{len(hanging)} of 8 requests hang"
    results = [future.result() for future in futures]
    done = {seed: r for seed, r in enumerate(results) if r != "refused"}
    # one running and 4 waiting places: at least 3 of 8 arriving at once are refused (fewer only if a job ended
    # before all had arrived, which 30 steps make unlikely, and which this does not count as a failure)
    assert 1 <= len(done) < 8, [r if r == "refused" else "done" for r in results]
    for seed, (candidates, _, used_seed, _) in done.items():  # its own image: the same call made alone
        assert used_seed == 100 + seed
        alone = _python_api(demo_app.pipeline, [100 + seed], last_stage=1, stage_1_num_inference_steps=30,
                            stage_1_guidance_scale=2.0)[0]  # fmt: skip
        np.testing.assert_array_equal(_pixels(candidates[0]), np.asarray(alone))
    del results, done
    gc.collect()
    after = process.memory_info().rss
    assert after <= 1.1 * before, (before, after)


def test_offload_is_chosen_from_the_free_gpu_memory():
    gib = 2**30
    assert choose_offload(20 * gib, 9 * gib, None) == "none"  # the CPU
    assert choose_offload(20 * gib, 9 * gib, 80 * gib) == "none"
    assert choose_offload(20 * gib, 9 * gib, 16 * gib) == "model"
    assert choose_offload(20 * gib, 9 * gib, 10 * gib) == "sequential"


def test_serve_without_gradio_names_the_install_command(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["serve", "--port", "0"]) == 1
    assert 'pip install "if-diffusers[app]"' in capsys.readouterr().err


def test_generate_settings_refuses_options_it_fixes(tmp_path, capsys):
    record = GenerationRecord(PROMPT, None, 3, "text2img", {"stage_1_num_inference_steps": 2}, 1,
                              {"model": BUNDLED_MODEL})  # fmt: skip
    (tmp_path / "s.json").write_text(record.to_json())
    with pytest.raises(SystemExit):
        main(["generate", "--settings", str(tmp_path / "s.json"), "--seed", "4"])
    assert "--seed with --settings: the settings file fixes it" in capsys.readouterr().err
    (tmp_path / "two.json").write_text(json.dumps([json.loads(record.to_json())] * 2))
    assert main(["generate", "--settings", str(tmp_path / "two.json"), "-o", str(tmp_path / "x.png")]) == 1
    assert "holds the settings of 2 images" in capsys.readouterr().err
    assert main(["generate", "--settings", str(tmp_path / "s.json"), "-o", str(tmp_path / "x.png")]) == 0
    assert PIL.Image.open(tmp_path / "x.png").size == (32, 32)


def test_the_space_folder_declares_the_app(tmp_path):
    """space/README.md's Spaces header (sdk gradio, pinned, app_file, licence, models) and its requirements."""
    import yaml

    readme = (ROOT / "space" / "README.md").read_text()
    header = yaml.safe_load(readme.split("---")[1])
    import gradio

    assert header["sdk"] == "gradio" and header["sdk_version"] == gradio.__version__
    assert (ROOT / "space" / header["app_file"]).is_file()
    assert {"DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-II-L-v1.0"} <= set(header["models"]) and header["license"]
    requirements = (ROOT / "space" / "requirements.txt").read_text()
    assert "if-diffusers[app]" in requirements and f"gradio=={gradio.__version__}" in requirements


def test_the_space_app_serves_the_same_app(tmp_path):
    """`python space/app.py`, as Spaces run it (GRADIO_SERVER_PORT set): the bundled model behind the four
    endpoints, reachable with gradio_client."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path)}  # fmt: skip
    server = subprocess.Popen([sys.executable, str(ROOT / "space" / "app.py")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not up yet
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.5)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/generate", "/upscale", "/img2img", "/inpaint"} <= set(endpoints)
        candidates = client.predict(PROMPT, "", 1, 0, False, "2", None, api_name="/generate")[0]
        assert _pixels(candidates[0]).shape == (32, 32, 3)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_bundled_models_examples_use_only_its_caption_words():
    from if_diffusers.app.ui import BUNDLED_EXAMPLES
    from if_diffusers.demo_cascade import unknown_words

    assert [unknown_words(example) for example in BUNDLED_EXAMPLES] == [[]] * len(BUNDLED_EXAMPLES)


def _wait_for_progress(job, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not job.status().progress_data:
        assert time.monotonic() < deadline, "the job never reported progress"
        time.sleep(0.05)


def test_endpoints_share_one_job_slot_and_a_dropped_request_stops_its_job(demo_app, tmp_path):
    """/generate and /img2img from two clients: the second waits while the first runs (one job on the models,
    whichever the endpoint). A client that goes away mid-job (gradio cancels its request) stops it between steps."""
    first, second = Client(demo_app.url, verbose=False), Client(demo_app.url, verbose=False)
    running = first.submit(PROMPT, "", 4, 0, False, "400", None, api_name="/generate")  # minutes if not stopped
    _wait_for_progress(running)
    waiting = second.submit(PROMPT, handle_file(_source_image(tmp_path)), "", 1.0, 0, False, "10,0", "", "2",
                            api_name="/img2img")  # fmt: skip
    time.sleep(1.0)
    assert waiting.status().code.name == "IN_QUEUE" and not running.done()
    started = time.monotonic()
    running.cancel()  # as a closed page: the request is dropped
    assert len(waiting.result(timeout=60)[1]) == 2 and time.monotonic() - started < 15  # the image and its source


def test_a_record_is_checked_and_replays_only_where_its_noise_was_drawn(demo_app):
    good = dict(prompt=PROMPT, negative_prompt=None, seed=3, mode="text2img", arguments={}, last_stage=1)
    for change, message in ((dict(seed="3"), "seed='3': expected a value of type int"), (dict(last_stage=4), "last_stage=4"),
                            (dict(dtype="int8"), "dtype='int8'"), (dict(arguments={"eta": 1}), "arguments has"),
                            (dict(mode="img2img"), "image_sha256 / mask_sha256 do not fit")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            GenerationRecord(**{**good, **change})
    with pytest.raises(ValueError, match="drew their noise on cuda; the pipeline runs on cpu"):
        GenerationRecord(**good, device="cuda").replay(demo_app.pipeline)
