"""The web UI at ``/`` in a real headless browser: Debian's chromium driven by Selenium (chromedriver).

Generate from the page, paint a mask on its canvas with the pointer and inpaint, cancel a running job, a CFG
sweep and an interpolation video; what the page shows is compared, pixel for pixel, with the pipelines called
directly. Screenshots go to $MLX_STABLEFUSED_SCREENSHOTS (else the test's temporary folder). Slow: a browser
start alone takes ~2 s. Skipped where chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                 reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")

from PIL import Image  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from mlx_stablefused.demo import DEMO_MODEL_ID  # noqa: E402
from mlx_stablefused.server import ServerSettings, create_app  # noqa: E402
from mlx_stablefused.server.engine import Engine  # noqa: E402
from test_server import SIZE, STEPS, Running, direct, pixels  # noqa: E402


@pytest.fixture(scope="module")
def served():
    settings = ServerSettings(model=DEMO_MODEL_ID)
    engine = Engine(settings)
    engine.call(lambda e: e.load(DEMO_MODEL_ID))
    running = Running(create_app(settings, engine))
    yield running, engine
    running.stop()
    engine.close()


def start_browser() -> object:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1050"):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    folder = os.environ.get("MLX_STABLEFUSED_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screens")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def fill(driver, **values) -> None:
    for name, value in values.items():
        element = driver.find_element(By.ID, name)
        if element.get_attribute("type") == "checkbox":
            if element.is_selected() != bool(value):
                element.click()
        else:
            driver.execute_script("arguments[0].value = arguments[1]", element, str(value))


def tab(driver, name: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-tab="{name}"]').click()


def generate_and_wait(driver, cards: int, timeout: float = 60) -> None:
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == cards
                                         or d.find_element(By.ID, "error").is_displayed())
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text


def shown_images(driver) -> list[Image.Image]:
    """The result panel's images, decoded from their data URLs."""
    sources = [el.get_attribute("src") for el in driver.find_elements(By.CSS_SELECTOR, "#result img")]
    return [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) for src in sources]


def data_url_image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


FAST = dict(width=SIZE, height=SIZE, steps=STEPS, cfg_scale=1)


def test_generate_paint_a_mask_and_inpaint_then_cancel(served, browser, screens):
    running, engine = served
    open_page(browser, running.url)
    assert "demo model" in browser.find_element(By.ID, "model-label").text  # said, as the CLI says it

    fill(browser, prompt="a red lighthouse", negative_prompt="fog", seed=7, sampler_name="Euler a", **FAST)
    generate_and_wait(browser, 1)
    browser.save_screenshot(str(screens / "1-txt2img.png"))
    (start,) = shown_images(browser)
    ref = direct(engine, "txt2img", prompt="a red lighthouse", negative_prompt="fog", seed=7)
    assert np.array_equal(pixels(start), ref)
    link = browser.find_element(By.CSS_SELECTOR, "#result-links a")
    assert link.get_attribute("download") == "mlx-stablefused-txt2img-7.png"
    assert "Seed: 7," in browser.find_element(By.CSS_SELECTOR, "#gallery .card .params").get_attribute("title")

    # Inpainting: the result sent on from the gallery, a stroke painted across its middle with the pointer.
    browser.find_element(By.XPATH, "//div[@class='card']//button[text()='To inpaint']").click()
    fill(browser, prompt="a window", seed=4, mask_blur=0, inpainting_fill=1, denoising_strength=0.75, brush=40)
    canvas = browser.find_element(By.ID, "mask-canvas")
    shown = canvas.size["width"]
    ActionChains(browser).move_to_element_with_offset(canvas, -shown // 3, 0).click_and_hold() \
        .move_by_offset(shown // 3, 0).move_by_offset(shown // 3, 0).release().perform()
    browser.save_screenshot(str(screens / "2-mask-painted.png"))
    generate_and_wait(browser, 2)
    browser.save_screenshot(str(screens / "3-inpainted.png"))
    mask = data_url_image(browser.execute_script("return painter.mask.toDataURL('image/png')")).convert("L")
    m = np.asarray(mask)
    middle = SIZE // 2  # the stroke: a band across the middle row, from a sixth to five sixths of the width
    assert m[middle, middle] == 255 and m[middle, 1] == 0 and m[middle, -2] == 0 and m[2, middle] == 0
    assert 0.05 < (m > 127).mean() < 0.4
    (painted,) = shown_images(browser)
    assert np.array_equal(pixels(painted), direct(engine, "inpaint", image=start, mask=mask, prompt="a window",
                                                  strength=0.75, seed=4))

    # Cancel: a 150-step job shows its progress and live preview, then stops after the current step.
    tab(browser, "txt2img")
    fill(browser, prompt="slow", seed=2, steps=150)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: "step" in d.find_element(By.ID, "progress-text").text
                                     and d.find_element(By.ID, "live-preview").is_displayed())
    preview = data_url_image(browser.find_element(By.ID, "live-preview").get_attribute("src"))
    assert preview.size == (SIZE, SIZE)
    browser.save_screenshot(str(screens / "4-running.png"))
    asked = time.perf_counter()
    browser.find_element(By.ID, "cancel").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card.interrupted"))
    assert time.perf_counter() - asked < 5  # 150 steps would take much longer
    assert "interrupted" in browser.find_element(By.ID, "result-params").text
    assert not browser.find_element(By.ID, "cancel").is_enabled()
    browser.save_screenshot(str(screens / "5-cancelled.png"))


def test_img2img_from_a_file_sweep_and_videos_from_the_page(served, browser, screens, tmp_path):
    running, engine = served
    open_page(browser, running.url)
    wide = Image.new("RGB", (2 * SIZE, SIZE), (200, 40, 40))  # a 2:1 file, cropped to the square (resize_mode 1)
    wide.paste((40, 40, 200), (SIZE // 2, 0, 3 * SIZE // 2, SIZE))
    wide.save(tmp_path / "wide.png")
    tab(browser, "img2img")
    browser.find_element(By.ID, "init_file").send_keys(str(tmp_path / "wide.png"))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "init-preview").is_displayed())
    fill(browser, prompt="a blue door", seed=8, sampler_name="Euler", resize_mode=1, denoising_strength=0.5, **FAST)
    generate_and_wait(browser, 1)
    (edited,) = shown_images(browser)
    centre = wide.crop((SIZE // 2, 0, 3 * SIZE // 2, SIZE))
    assert np.array_equal(pixels(edited), direct(engine, "img2img", "euler", image=centre, prompt="a blue door",
                                                 strength=0.5, seed=8))
    browser.save_screenshot(str(screens / "6-img2img.png"))

    tab(browser, "sweep")
    fill(browser, prompt="a boat", seed=3, sampler_name="Euler", cfg_scales="1, 2, 4", **FAST)
    generate_and_wait(browser, 2)
    (grid,) = shown_images(browser)
    assert grid.width == 3 * SIZE
    cell = pixels(grid)[:SIZE, 2 * SIZE:3 * SIZE]
    assert np.array_equal(cell, direct(engine, "txt2img", "euler", prompt="a boat", seed=3, guidance_scale=4))
    browser.save_screenshot(str(screens / "7-sweep.png"))

    tab(browser, "interpolate")
    fill(browser, prompts="a boat\na car\na tree", seed=5, frames_pair=2, format="gif", **FAST)
    generate_and_wait(browser, 3)
    (video,) = shown_images(browser)
    assert video.format == "GIF" and video.n_frames == 5
    browser.save_screenshot(str(screens / "8-interpolation.png"))

    tab(browser, "animatediff")
    fill(browser, prompt="a boat", seed=6, frames_video=4, **FAST)
    generate_and_wait(browser, 4)
    (clip,) = shown_images(browser)
    assert clip.n_frames == 4
    browser.save_screenshot(str(screens / "9-animatediff.png"))


def test_a_model_without_motion_adapter_says_why_there_is_no_animatediff(sd1, browser, screens):
    model = str(sd1[1])
    settings = ServerSettings(model=model)
    engine = Engine(settings)
    engine.call(lambda e: e.load(model))
    running = Running(create_app(settings, engine))
    try:
        open_page(browser, running.url)
        assert "demo" not in browser.find_element(By.ID, "model-label").get_attribute("class")
        tab(browser, "animatediff")
        notice = browser.find_element(By.ID, "unavailable")
        assert notice.is_displayed() and "--motion-adapter" in notice.text
        assert not browser.find_element(By.ID, "generate").is_enabled()
        browser.save_screenshot(str(screens / "10-no-motion-adapter.png"))
        tab(browser, "txt2img")
        assert browser.find_element(By.ID, "generate").is_enabled()
    finally:
        running.stop()
        engine.close()
