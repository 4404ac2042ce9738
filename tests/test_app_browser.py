"""The app in a real browser: Playwright (PyPI) drives Debian's Chromium headless (`apt-get install -y chromium`,
README's "Tests") against the app served on localhost over the bundled demo cascade, as a user clicks through it.
A screenshot of each step goes to `test-artifacts/browser/` (`IF_DIFFUSERS_TEST_ARTIFACTS` to move it); the one
after upscaling is README's picture of the app. Without Chromium these tests fail: they never skip."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from playwright.sync_api import expect, sync_playwright

from if_diffusers.generation_record import GenerationRecord
from if_diffusers.synthetic import shapes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(os.environ.get("IF_DIFFUSERS_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
PROMPT = "a red circle on a blue background"
WAIT_MS = 60_000  # a generous bound for one job on a loaded 2-core machine (each takes about a second)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium (README, 'Tests')"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_app):
    context = browser.new_context(viewport={"width": 1280, "height": 1400}, accept_downloads=True)
    page = context.new_page()
    page.goto(demo_app.url)
    page.locator("#prompt textarea").wait_for()
    yield page
    context.close()


def _shot(page, name: str) -> None:
    folder = ARTIFACTS / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=folder / f"{name}.png", full_page=True)


def _fast_settings(page, seed: int) -> None:
    """A fixed seed and few steps (the advanced settings), so that each job takes about a second."""
    page.locator("#randomize input").uncheck()
    page.locator("#seed input").fill(str(seed))
    page.get_by_text("Advanced settings").click()
    for field, value in (("#stage-1-steps", "5"), ("#stage-2-steps", "4")):
        box = page.locator(f"{field} textarea")
        for _ in range(20):  # the accordion's fields set their value once mounted: typing at once can be undone
            box.fill(value)
            page.wait_for_timeout(100)
            if box.input_value() == value:
                break
        expect(box).to_have_value(value)


def _download(page, link) -> tuple[Path, PIL.Image.Image]:
    with page.expect_download() as download:
        link.click()
    path = ARTIFACTS / "browser" / download.value.suggested_filename
    download.value.save_as(path)
    return path, PIL.Image.open(path)


def test_generate_choose_a_candidate_upscale_and_download(page, demo_app):
    page.locator("#prompt textarea").fill(PROMPT)
    _fast_settings(page, seed=21)
    _shot(page, "1-prompt")
    page.locator("#generate").click()
    thumbnails = page.locator("#candidates-gallery button.thumbnail-item img")
    expect(thumbnails).to_have_count(4, timeout=WAIT_MS)
    _shot(page, "2-candidates")
    thumbnails.nth(2).click()  # the third candidate: seed 23
    expect(page.locator("#candidate input")).to_have_value("3")
    page.locator("#prompt textarea").fill("a green square")  # the candidates on show are upscaled, not the new text
    page.locator("#upscale").click()
    link = page.locator("#upscaled-files a[download]")
    expect(link).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#status")).to_contain_text("Done")
    _shot(page, "3-upscaled")
    files = page.locator("#upscaled-files").bounding_box()  # README's picture: the page down to the download
    page.screenshot(path=ARTIFACTS / "browser" / "app.png", full_page=True,
                    clip={"x": 0, "y": 0, "width": 1280, "height": files["y"] + files["height"] + 16})  # fmt: skip
    path, image = _download(page, link)
    record = GenerationRecord.from_png(path)
    assert image.size == (128, 128) and record.prompt == PROMPT and record.seed == 23 and record.last_stage == 2
    assert (
        record.arguments["stage_1_num_inference_steps"] == 5 and record.arguments["stage_2_num_inference_steps"] == 4
    )
    again = record.replay(demo_app.pipeline).images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(again))


def test_paint_a_mask_and_inpaint(page, tmp_path):
    source = tmp_path / "source.png"
    shapes.render(shapes.sample_record(3), 96).save(source)
    page.locator("#prompt textarea").fill("a yellow circle on a purple background")
    _fast_settings(page, seed=5)
    page.get_by_role("tab", name="Inpainting").click()
    page.locator("#inpaint-editor input[type=file]").set_input_files(source)
    canvas = page.locator("#inpaint-editor canvas").first
    expect(canvas).to_be_visible()
    page.locator("#inpaint-editor button[aria-label=Brush]").click()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 60, y)
    page.mouse.down()
    for step in range(1, 13):
        page.mouse.move(x - 60 + 10 * step, y + (step % 2) * 8)
    page.mouse.up()
    _shot(page, "4-mask-painted")
    page.locator("#inpaint").click()
    links = page.locator("#inpaint-files a[download]")
    expect(links).to_have_count(3, timeout=WAIT_MS)  # the image, and the source and mask that replay it
    _shot(page, "5-inpainted")
    path, image = _download(page, links.nth(0))
    record = GenerationRecord.from_png(path)
    assert record.mode == "inpaint" and image.size == (128, 128)
    _, source = _download(page, links.nth(1))
    _, mask = _download(page, links.nth(2))
    record.check_images(source.convert("RGB"), mask.convert("L"))  # the painted mask, as the app used it
    assert 0 < np.asarray(mask).mean() < 255


def test_an_example_runs_and_is_cached(page):
    page.get_by_text("a green triangle on a white background").click()
    expect(page.locator("#prompt textarea")).to_have_value("a green triangle on a white background")
    expect(page.locator("#candidates-gallery button.thumbnail-item img")).to_have_count(4, timeout=WAIT_MS)


def test_bad_input_shows_a_message(page):
    page.locator("#generate").click()  # no prompt
    expect(page.get_by_text("the prompt is empty")).to_be_visible(timeout=WAIT_MS)
    _shot(page, "6-error")
    page.locator("#prompt textarea").fill(PROMPT)  # and the page still works
    _fast_settings(page, seed=1)
    page.locator("#candidates input[type=number]").fill("1")
    page.locator("#candidates input[type=number]").press("Enter")
    page.locator("#generate").click()
    expect(page.locator("#candidates-gallery button.thumbnail-item img")).to_have_count(1, timeout=WAIT_MS)
