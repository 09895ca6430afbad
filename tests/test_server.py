"""The local server, driven by the real clients people use against it: webuiapi (AUTOMATIC1111's API), the
openai package (Images API) and sd-parsers (A1111's PNG parameters); results compared, pixel for pixel,
with the same pipelines called directly.

One real uvicorn server per module on a free loopback port (plus a second app with an API key and an
outputs folder on the same engine), the demo model at 32x32 and 2 steps (64x64 in the slow variant).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
sd_parsers = pytest.importorskip("sd_parsers")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from helpers import report  # noqa: E402
from mlx_stablefused.demo import DEMO_MODEL_ID  # noqa: E402
from mlx_stablefused.server import Limits, ServerSettings, create_app  # noqa: E402
from mlx_stablefused.server.engine import Engine, fill_masked  # noqa: E402
from mlx_stablefused.server.jobs import RunControl  # noqa: E402

SIZE, STEPS = 32, 2  # 32x32: a quarter of 64x64's time (the VAE decode dominates); 64x64 in the slow test
BOX = (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4)  # the masked square
KEY = "sekrit"
FAST = dict(width=SIZE, height=SIZE, steps=STEPS, cfg_scale=1.0)  # cfg 1: one UNet pass per step


class Running:
    """A uvicorn server on its own thread and socket."""

    def __init__(self, app: object) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def write_tiny_lora(folder: Path) -> None:
    """A kohya-format LoRA on one attention projection of the demo UNet (rank 2, large enough to show)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": rng.standard_normal((2, 64)).astype(np.float32),
               f"{name}.lora_up.weight": rng.standard_normal((64, 2)).astype(np.float32),
               f"{name}.alpha": np.array(2.0, dtype=np.float32)}, str(folder / "tiny.safetensors"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    write_tiny_lora(loras)
    settings = ServerSettings(model=DEMO_MODEL_ID, lora_dir=loras)
    engine = Engine(settings)
    engine.call(lambda e: e.load(DEMO_MODEL_ID))
    outputs = tmp_path_factory.mktemp("outputs")
    keyed_settings = ServerSettings(model=DEMO_MODEL_ID, api_key=KEY, outputs=outputs, lora_dir=loras,
                                    limits=Limits(max_steps=150))
    plain, keyed = Running(create_app(settings, engine)), Running(create_app(keyed_settings, engine))
    yield {"plain": plain, "keyed": keyed, "engine": engine, "outputs": outputs}
    plain.stop()
    keyed.stop()
    engine.close()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


_REFERENCES: dict[str, np.ndarray] = {}


def direct(engine: Engine, mode: str, sampler: str = "euler_ancestral", overrides: dict | None = None,
           **kwargs) -> np.ndarray:
    """The same job on the engine's own pipeline, called directly (on its thread), as the reference
    (text-to-image references are kept: the A1111 and OpenAI tests ask for the same ones)."""
    key = repr((engine.model_id, mode, sampler, overrides, sorted(kwargs.items()))) if mode == "txt2img" else None
    if key in _REFERENCES:
        return _REFERENCES[key]

    def run(e: Engine) -> Image.Image:
        pipe = e.pipes[mode]
        pipe.set_scheduler(sampler, **(overrides or {}))
        sizes = {} if isinstance(kwargs.get("image"), np.ndarray) else dict(image_height=SIZE, image_width=SIZE)
        return pipe(**{**sizes, "num_inference_steps": STEPS, "guidance_scale": 1.0, **kwargs})[0]
    out = pixels(engine.call(run))
    if key is not None:
        _REFERENCES[key] = out
    return out


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_webuiapi_txt2img_img2img_inpainting_and_the_png_parameters(servers):
    api = webuiapi.WebUIApi(port=servers["plain"].port, sampler="Euler a", steps=STEPS)
    engine = servers["engine"]
    result = api.txt2img(prompt="a red lighthouse", negative_prompt="fog", seed=7, batch_size=2, **FAST)
    assert [im.size for im in result.images] == [(SIZE, SIZE)] * 2
    assert result.info["seed"] == 7 and result.info["all_seeds"] == [7, 8]
    for image, seed in zip(result.images, (7, 8)):  # image k from seed + k, as A1111 numbers them
        ref = direct(engine, "txt2img", prompt="a red lighthouse", negative_prompt="fog", seed=seed)
        assert np.array_equal(pixels(image), ref)

    parsed = sd_parsers.ParserManager().parse(result.images[1])  # what A1111's PNG Info shows
    sampler = parsed.samplers[0]
    assert (sampler.name, sampler.parameters["seed"], sampler.parameters["steps"]) == ("Euler a", "8", str(STEPS))
    assert [p.value for p in sampler.prompts] == ["a red lighthouse"]
    assert [p.value for p in sampler.negative_prompts] == ["fog"]

    random = api.txt2img(prompt="x", seed=-1, **FAST)  # -1: a random seed, the one used reported
    assert random.info["seed"] >= 0 and f"Seed: {random.info['seed']}," in random.image.info["parameters"]

    start = result.images[0]
    edited = api.img2img(images=[start], prompt="a blue lighthouse", seed=3, denoising_strength=0.5,
                         sampler_name="DPM++ 2M", scheduler="Karras", **FAST)
    ref = direct(engine, "img2img", "dpm_multistep", {"use_karras_sigmas": True}, image=start,
                 prompt="a blue lighthouse", strength=0.5, seed=3)
    assert np.array_equal(pixels(edited.image), ref)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in edited.image.info["parameters"]

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, BOX)
    painted = api.img2img(images=[start], mask_image=mask, prompt="a window", seed=4, denoising_strength=0.75,
                          mask_blur=0, inpainting_fill=1, **FAST)
    ref = direct(engine, "inpaint", image=start, mask=mask, prompt="a window", strength=0.75, seed=4)
    assert np.array_equal(pixels(painted.image), ref)
    filled = api.img2img(images=[start], mask_image=mask, prompt="a window", seed=4, denoising_strength=0.75,
                         mask_blur=4, inpainting_fill=0, **FAST)  # A1111's default: fill, blurred mask
    blurred = mask.filter(ImageFilter.GaussianBlur(4))
    ref = direct(engine, "inpaint", image=fill_masked(start, blurred), mask=blurred, prompt="a window", strength=0.75,
                 seed=4)
    assert np.array_equal(pixels(filled.image), ref)


def test_fill_paints_the_masked_part_with_its_surroundings():
    """A1111's inpainting_fill 0: a red square inside a blue image, masked, comes back blue."""
    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 255))
    image.paste((255, 0, 0), BOX)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, BOX)
    filled = pixels(fill_masked(image, mask))
    assert np.abs(filled[BOX[1]:BOX[3], BOX[0]:BOX[2]] - [0, 0, 255]).max() <= 2
    assert np.array_equal(filled[:BOX[1]], pixels(image)[:BOX[1]])  # outside the mask: untouched


def test_webuiapi_lists_progress_interrupt_and_lora_tags(servers):
    api = webuiapi.WebUIApi(port=servers["plain"].port, steps=STEPS)
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM", "UniPC"} <= set(names)
    assert {s["name"] for s in api.get_schedulers()} == {"automatic", "uniform", "karras"}
    assert DEMO_MODEL_ID in api.util_get_model_names()
    api.util_set_model(DEMO_MODEL_ID, find_closest=False)
    assert api.util_get_current_model() == DEMO_MODEL_ID
    assert [lora["name"] for lora in api.get_loras()] == ["tiny"]
    assert api.get_progress()["progress"] == 0.0

    tagged = api.txt2img(prompt="<lora:tiny:1> a cat", seed=1, **FAST).image
    assert np.array_equal(pixels(tagged), direct(servers["engine"], "txt2img", prompt="<lora:tiny:1> a cat", seed=1))
    assert not np.array_equal(pixels(tagged), direct(servers["engine"], "txt2img", prompt="a cat", seed=1))

    # A long job, interrupted from another client once it has started: it returns early, with an image.
    keyed = webuiapi.WebUIApi(port=servers["keyed"].port, steps=150, username="any", password=KEY)  # Basic
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(keyed.txt2img, prompt="slow", seed=2, width=SIZE, height=SIZE, steps=150, cfg_scale=1.0)
        while (progress := api.get_progress())["state"]["sampling_step"] < 2:
            time.sleep(0.02)
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))  # the step's cheap preview
        assert preview.format == "PNG" and preview.size == (SIZE, SIZE)
        skipped = api.session.get(f"{api.baseurl}/progress", params={"skip_current_image": "true"}).json()
        assert skipped["current_image"] is None
        eta = progress["eta_relative"]  # the time the other ~148 steps would take
        asked = time.perf_counter()
        api.interrupt()
        result = job.result(timeout=60)
    assert len(result.images) == 1 and time.perf_counter() - asked < eta / 3
    saved = sorted(servers["outputs"].iterdir())  # the keyed server writes its results
    assert [p.suffix for p in saved] == [".png"]
    assert Image.open(saved[0]).info["parameters"] == result.image.info["parameters"]


def test_openai_images_generate_edit_and_models(servers):
    client = openai.OpenAI(base_url=servers["plain"].url + "/v1", api_key="unused")
    assert DEMO_MODEL_ID in [m.id for m in client.models.list()]
    out = client.images.generate(model=DEMO_MODEL_ID, prompt="a red lighthouse", n=2, size=f"{SIZE}x{SIZE}",
                                 response_format="b64_json",
                                 extra_body={"seed": 7, "steps": STEPS, "cfg_scale": 1.0, "negative_prompt": "fog",
                                             "sampler_name": "Euler a"})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    engine = servers["engine"]
    for image, seed in zip(images, (7, 8)):  # A1111's seed numbering, as in the txt2img test
        ref = direct(engine, "txt2img", prompt="a red lighthouse", negative_prompt="fog", seed=seed)
        assert np.array_equal(pixels(image), ref)

    start = images[0]
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), BOX)  # OpenAI: the transparent part is edited
    edit = client.images.edit(image=("start.png", png(start), "image/png"), mask=("mask.png", png(mask), "image/png"),
                              prompt="a window", size=f"{SIZE}x{SIZE}", response_format="b64_json",
                              extra_body={"seed": 4, "steps": STEPS, "cfg_scale": 1.0, "sampler_name": "Euler a"})
    edited = Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json)))
    white = Image.new("L", (SIZE, SIZE), 0)
    white.paste(255, BOX)
    assert np.array_equal(pixels(edited), direct(engine, "inpaint", image=start, mask=white, prompt="a window",
                                                 strength=0.75, seed=4))
    with pytest.raises(openai.UnprocessableEntityError, match="size"):
        client.images.generate(prompt="x", size="13x13")


def test_eight_concurrent_clients_equal_sequential_runs(servers):
    url = servers["plain"].url + "/sdapi/v1/txt2img"

    def one(seed: int) -> np.ndarray:
        r = httpx.post(url, json={"prompt": "a boat", "seed": seed, "sampler_name": "Euler", **FAST}, timeout=60)
        assert r.status_code == 200, r.text
        return pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))

    seeds = list(range(20, 28))
    sequential = [one(s) for s in seeds]  # each waits for the last
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, seeds))
    assert all(np.array_equal(a, b) for a, b in zip(sequential, concurrent))
    assert len({a.tobytes() for a in sequential}) == 8


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(servers):
    base = servers["plain"].url + "/sdapi/v1"
    good = {"prompt": "a cat", "seed": 1, **FAST}
    cases = {"steps": {"steps": "many"}, "width": {"width": 13}, "steps ": {"steps": 0},
             "sampler_name": {"sampler_name": "Nonsense"}, "batch_size": {"batch_size": 9},
             "height": {"height": 4096}, "scheduler": {"sampler_name": "DDIM", "scheduler": "Karras"},
             "cfg_scale": {"cfg_scale": "NaN"}}
    for field, change in cases.items():
        r = httpx.post(base + "/txt2img", json={**good, **change})
        assert r.status_code == 422 and field.strip() in r.json()["error"], (change, r.text)
    r = httpx.post(base + "/img2img", json={**good, "init_images": ["not base64!"]})
    assert r.status_code == 422 and "init_images" in r.json()["error"]
    r = httpx.post(base + "/img2img", json={**good, "init_images": [base64.b64encode(b"not an image").decode()]})
    assert r.status_code == 422 and "init_images" in r.json()["error"]
    r = httpx.post(base + "/txt2img", content=b"{" + b" " * (50 * 2 ** 20) + b"}",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "body" in r.json()["error"]
    r = httpx.post(base + "/options", json={"sd_model_checkpoint": "not-served"})
    assert r.status_code == 422 and r.json()["error"].startswith("sd_model_checkpoint")
    r = httpx.post(base + "/txt2img", json={**good, "prompt": "<lora:missing:1> a cat"})  # fails in the pipeline
    assert r.status_code == 422 and r.json()["error"].startswith("prompt: <lora:missing")
    r = httpx.post(base + "/txt2img", json=good)
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_queue_limit_gives_503_with_retry_after(servers):
    engine, release, running = servers["engine"], threading.Event(), threading.Event()
    blocker = engine.worker.submit(lambda control: (running.set(), release.wait(30)), RunControl())
    try:
        running.wait(30)
        waiting = [engine.worker.submit(lambda control: None, RunControl()) for _ in range(engine.worker.max_waiting)]
        r = httpx.post(servers["plain"].url + "/sdapi/v1/txt2img", json={"prompt": "x", **FAST})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue" in r.json()["error"]
    finally:
        release.set()
    blocker.future.result(timeout=30)
    for task in waiting:
        task.future.result(timeout=30)


def test_a_job_named_by_force_task_id_has_its_own_progress_and_cancel(servers):
    """A1111's force_task_id and /internal/progress; /ui/v1/cancel of a waiting job: it returns at once with no
    image, and the running job is untouched (A1111's /interrupt would have stopped that one)."""
    url, engine = servers["plain"].url, servers["engine"]
    release, running, busy = threading.Event(), threading.Event(), RunControl()
    blocker = engine.worker.submit(lambda control: (running.set(), release.wait(30)), busy)
    try:
        running.wait(30)
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(httpx.post, url + "/sdapi/v1/txt2img", timeout=60,
                              json={"prompt": "x", "seed": 1, "force_task_id": "mine", **FAST})
            while not (state := httpx.post(url + "/internal/progress", json={"id_task": "mine"}).json())["queued"]:
                time.sleep(0.02)
            assert not state["active"] and state["queue_ahead"] == 0 and state["progress"] == 0
            assert httpx.post(url + "/ui/v1/cancel", json={"id_task": "mine"}).json() == {"cancelled": True}
            release.set()
            answer = job.result(timeout=60)
    finally:
        release.set()
    blocker.future.result(timeout=30)
    assert answer.status_code == 200 and answer.json()["images"] == [] and not busy.interrupted
    done = httpx.post(url + "/internal/progress", json={"id_task": "mine"}).json()
    assert done["completed"] and done["progress"] == 1.0 and not done["active"]
    assert httpx.post(url + "/ui/v1/cancel", json={"id_task": "nobody"}).json() == {"cancelled": False}


def test_api_key_is_enforced_and_loopback_is_the_default(servers, monkeypatch, capsys):
    url = servers["keyed"].url
    assert httpx.get(url + "/sdapi/v1/sd-models").status_code == 401
    assert httpx.get(url + "/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/sdapi/v1/sd-models", auth=("user", "wrong")).status_code == 401
    page = httpx.get(url + "/")  # the web UI's page asks the browser for the key (any user, the key as password)
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(url + "/", auth=("me", KEY)).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
    assert [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list().data][0] == DEMO_MODEL_ID

    from mlx_stablefused import cli

    binds = []
    monkeypatch.setattr("mlx_stablefused.server.engine.Engine", lambda settings: _NoModel())
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: binds.append((host, port)))
    assert cli.main(["serve", "--model", DEMO_MODEL_ID]) == 0
    assert binds[-1] == ("127.0.0.1", 7860) and "warning" not in capsys.readouterr().err
    assert cli.main(["serve", "--model", DEMO_MODEL_ID, "--host", "0.0.0.0", "--port", "8000"]) == 0
    assert binds[-1] == ("0.0.0.0", 8000) and "without an API key" in capsys.readouterr().err
    assert cli.main(["serve", "--model", DEMO_MODEL_ID, "--host", "0.0.0.0", "--api-key", "k"]) == 0
    assert "warning" not in capsys.readouterr().err


class _NoModel:
    """Stands in for the engine where only the command's binding is tested."""

    worker = None

    def call(self, fn):
        return None

    def close(self):
        pass


def test_a_client_that_disconnects_frees_the_worker(servers):
    worker = servers["engine"].worker
    with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-job and closes its connection
        httpx.post(servers["plain"].url + "/sdapi/v1/txt2img", timeout=0.5,
                   json={"prompt": "slow", "seed": 1, "width": SIZE, "height": SIZE, "steps": 150, "cfg_scale": 1.0})
    deadline = time.monotonic() + 1.5  # 150 steps take 5 s or more: the job was stopped, not finished
    while worker.current is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.current is None


def b64_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_hires_fix_resize_modes_and_latent_fills_through_webuiapi(servers):
    """A1111's hires fix ("Latent": torch's bilinear interpolate of the first pass's latent, then image-to-image),
    img2img's resize_mode 1 on a 2:1 image, inpainting_fill 3, each vs the pipelines called directly (resize_mode
    2 and inpainting_fill 2 in the slow variant)."""
    import torch

    from mlx_stablefused.server.resize import interpolate_latent

    api = webuiapi.WebUIApi(port=servers["plain"].port, sampler="Euler a", steps=STEPS)
    engine = servers["engine"]
    hr = api.txt2img(prompt="a tower", seed=9, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                     denoising_strength=0.6, **FAST).image
    assert hr.size == (2 * SIZE, 2 * SIZE)
    assert "Denoising strength: 0.6, Hires upscale: 2.0, Hires steps: 2, Hires upscaler: Latent" in hr.info["parameters"]
    first = engine.call(lambda e: (e.pipes["txt2img"].set_scheduler("euler_ancestral"), e.pipes["txt2img"](
        prompt="a tower", seed=9, image_height=SIZE, image_width=SIZE, num_inference_steps=STEPS, guidance_scale=1.0,
        output_type="latent"))[1])
    up = torch.nn.functional.interpolate(torch.from_numpy(first), scale_factor=2, mode="bilinear").numpy()
    ref = direct(engine, "img2img", image=up, prompt="a tower", strength=0.6, seed=9)
    assert np.abs(pixels(hr) - ref).max() <= 1  # the latents agree with torch's to float rounding (below)
    odd = np.random.default_rng(0).standard_normal((1, 4, 5, 7)).astype(np.float32)
    for mode in ("bilinear", "nearest", "nearest-exact"):  # A1111's latent upscalers are these torch calls
        ref = torch.nn.functional.interpolate(torch.from_numpy(odd), size=(12, 9), mode=mode).numpy()
        assert np.abs(interpolate_latent(odd, 12, 9, mode) - ref).max() < 1e-6, mode

    wide = Image.new("RGB", (2 * SIZE, SIZE))  # four colour bands, left to right
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        wide.paste(colour, (k * SIZE // 2, 0, (k + 1) * SIZE // 2, SIZE))
    cropped = api.img2img(images=[wide], resize_mode=1, prompt="x", seed=2, denoising_strength=0.5, **FAST).image
    centre = wide.crop((SIZE // 2, 0, 3 * SIZE // 2, SIZE))  # crop and resize: the middle square
    assert np.array_equal(pixels(cropped), direct(engine, "img2img", image=centre, prompt="x", strength=0.5, seed=2))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, BOX)
    results = {1: direct(engine, "inpaint", image=centre, mask=mask, prompt="a window", strength=0.75, seed=4)}
    for fill, content in ((3, "latent nothing"),):
        out = api.img2img(images=[centre], mask_image=mask, prompt="a window", seed=4, denoising_strength=0.75,
                          mask_blur=0, inpainting_fill=fill, **FAST).image
        results[fill] = pixels(out)
        assert np.array_equal(results[fill], direct(engine, "inpaint", image=centre, mask=mask, prompt="a window",
                                                    strength=0.75, seed=4, masked_content=content)), fill
    assert len({r.tobytes() for r in results.values()}) == 2


def test_masked_content_starts_the_masked_latent_from_noise_or_zeros(servers):
    """InpaintDiffusion's masked_content (A1111's fill 2 and 3), read off the run's starting latent: it is
    a x + b eps, so against "original" (x the image's latent) "latent nothing" lacks a x inside the mask and
    "latent noise" has a z there instead (z the first draw from the seed, as eps is given); outside, all equal."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, BOX)  # on the 8-pixel grid: latent cells 1..2 of 4 in both directions
    image = Image.new("RGB", (SIZE, SIZE), (200, 60, 30))
    eps = np.random.default_rng(11).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)

    def starts(e: Engine) -> tuple:
        pipe = e.pipes["inpaint"]
        pipe.set_scheduler("euler")
        out = {c: pipe(prompt="x", image=image, mask=mask, num_inference_steps=STEPS, strength=0.75, noise=eps,
                       seed=5, guidance_scale=1.0, output_type="latent", return_latent_history=True,
                       masked_content=c)[:, 0] for c in ("original", "latent nothing", "latent noise")}
        return out, np.asarray(pipe.image_to_latent(image))
    out, x = servers["engine"].call(starts)
    inside = np.zeros(x.shape, bool)
    inside[..., 1:3, 1:3] = True
    z = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    a = (out["original"] - out["latent nothing"])[inside] / x[inside]
    assert report("masked_content latent nothing: a x inside the mask (spread of a)", np.abs(a - a.mean()).max()) < 1e-4
    assert a.mean() > 0.1
    noise_error = np.abs(out["latent noise"] - out["latent nothing"] - a.mean() * z * inside).max()
    assert report("masked_content latent noise: a z inside the mask (max abs)", noise_error) < 1e-4
    for content in ("latent nothing", "latent noise"):
        assert np.array_equal(out[content][~inside], out["original"][~inside])


def test_web_ui_jobs_sweep_and_videos_equal_the_pipelines(servers, tmp_path):
    """/ui/v1: a CFG sweep's cells are txt2img at each scale; an interpolation's frames are
    LatentWalkDiffusion.interpolate from one starting noise; bad values 422 (AnimateDiff and latent walks in the
    slow variant)."""
    url, engine = servers["plain"].url, servers["engine"]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/ui/static/app.js" in page.text
    assert httpx.get(url + "/ui/static/app.js").status_code == 200
    assert httpx.get(url + "/ui/static/secret.py").status_code == 404
    caps = httpx.get(url + "/ui/v1/capabilities").json()
    assert caps["is_demo"] and all(reason is None for reason in caps["modes"].values())

    saving = Running(create_app(ServerSettings(model=DEMO_MODEL_ID, outputs=tmp_path), engine))  # --outputs
    sweep = httpx.post(saving.url + "/ui/v1/sweep", timeout=60, json={"prompt": "a boat", "seed": 3, "sampler_name": "Euler",
                                                               "cfg_scales": [1, 4], **FAST}).json()
    for b64, scale in zip(sweep["images"], (1, 4)):
        assert np.array_equal(pixels(b64_image(b64)), direct(engine, "txt2img", "euler", prompt="a boat", seed=3,
                                                             guidance_scale=scale))
    assert b64_image(sweep["grid"]).width == 2 * SIZE and "CFG scale: 4" in sweep["infotexts"][1]

    body = {"kind": "interpolate", "prompts": ["a boat", "a car"], "frames": 1, "seed": 5, "sampler_name": "Euler",
            **FAST}
    video = httpx.post(saving.url + "/ui/v1/video", json=body, timeout=60).json()
    saving.stop()
    written = {p.name.rsplit("-", 1)[-1]: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(written) == ["0.png", "1.png", "grid.png", "video.gif"]
    assert written["video.gif"] == base64.b64decode(video["video"])
    gif = b64_image(video["video"])
    assert video["mime"] == "image/gif" and gif.n_frames == 2 and len(video["frames"]) == 2

    def interpolate(e: Engine) -> list:
        pipe = e.walk_pipeline()
        pipe.set_scheduler("euler")
        noise = np.random.default_rng(5).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
        return pipe.interpolate(prompt=["a boat", "a car"], latent=np.repeat(noise, 2, axis=0), interpolation_steps=1,
                                num_inference_steps=STEPS, guidance_scale=1.0, seed=5, batch_size=1)
    for got, ref in zip(video["frames"], engine.call(interpolate), strict=True):
        assert np.array_equal(pixels(b64_image(got)), pixels(ref))

    body = {"kind": "animatediff", "prompts": ["a boat"], "frames": 4, "seed": 6, **FAST}
    for change, field in (({"kind": "nope"}, "kind"), ({"frames": 100}, "frames"), ({"format": "avi"}, "format"),
                          ({"kind": "interpolate"}, "prompts")):
        r = httpx.post(url + "/ui/v1/video", json={**body, **change})
        assert r.status_code == 422 and r.json()["error"].startswith(field), (change, r.text)
    r = httpx.post(url + "/ui/v1/sweep", json={"prompt": "x", "cfg_scales": [1] * 65, **FAST})
    assert r.status_code == 422 and r.json()["error"].startswith("cfg_scales")


@pytest.mark.slow
def test_resize_and_fill_latent_noise_animatediff_and_latent_walk(servers):
    """The slow variants: img2img's resize_mode 2, inpainting_fill 2, AnimateDiff and latent-walk videos vs the
    pipelines called directly."""
    from mlx_stablefused.server.resize import resize_and_fill

    api = webuiapi.WebUIApi(port=servers["plain"].port, sampler="Euler a", steps=STEPS)
    url, engine = servers["plain"].url, servers["engine"]
    wide = Image.new("RGB", (2 * SIZE, SIZE))
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        wide.paste(colour, (k * SIZE // 2, 0, (k + 1) * SIZE // 2, SIZE))
    fitted = resize_and_fill(wide, SIZE, SIZE)
    band = SIZE // 4  # resize and fill: the whole image scaled into the middle, the edge rows stretched
    assert np.array_equal(pixels(fitted)[band:SIZE - band], pixels(wide.resize((SIZE, SIZE // 2), Image.LANCZOS)))
    assert (pixels(fitted)[:band] == pixels(fitted)[:1]).all() and (pixels(fitted)[-band:] == pixels(fitted)[-1:]).all()
    filled = api.img2img(images=[wide], resize_mode=2, prompt="x", seed=2, denoising_strength=0.5, **FAST).image
    assert np.array_equal(pixels(filled), direct(engine, "img2img", image=fitted, prompt="x", strength=0.5, seed=2))

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, BOX)
    out = api.img2img(images=[fitted], mask_image=mask, prompt="a window", seed=4, denoising_strength=0.75,
                      mask_blur=0, inpainting_fill=2, **FAST).image
    assert np.array_equal(pixels(out), direct(engine, "inpaint", image=fitted, mask=mask, prompt="a window",
                                              strength=0.75, seed=4, masked_content="latent noise"))

    body = {"kind": "animatediff", "prompts": ["a boat"], "frames": 4, "seed": 6, **FAST}
    video = httpx.post(url + "/ui/v1/video", json=body, timeout=60).json()
    ref = engine.call(lambda e: e.video_pipeline()(prompt="a boat", video_height=SIZE, video_width=SIZE, video_frames=4,
                                                   num_inference_steps=STEPS, guidance_scale=1.0, seed=6)[0])
    assert all(np.array_equal(pixels(b64_image(g)), pixels(r)) for g, r in zip(video["frames"], ref, strict=True))

    body = {"kind": "latent_walk", "prompts": ["a boat"], "frames": 2, "points": 2, "loop": True, "seed": 7,
            "sampler_name": "Euler", **FAST}
    video = httpx.post(url + "/ui/v1/video", json=body, timeout=60).json()

    def walk(e: Engine) -> list:
        pipe = e.walk_pipeline()
        pipe.set_scheduler("euler")
        noise = np.random.default_rng(7).standard_normal((2, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
        return pipe.interpolate(prompt=["a boat"] * 3, latent=np.concatenate([noise, noise[:1]]), interpolation_steps=2,
                                num_inference_steps=STEPS, guidance_scale=1.0, seed=7, batch_size=1)
    frames = [pixels(b64_image(f)) for f in video["frames"]]
    assert len(frames) == 5 and np.array_equal(frames[0], frames[-1])  # the loop closes on its first frame
    assert all(np.array_equal(g, pixels(r)) for g, r in zip(frames, engine.call(walk), strict=True))


@pytest.mark.slow
def test_a_batch_equals_its_images_run_alone_at_64x64(servers):
    """A1111's numbering at 64x64: image k of batch_size 4 x n_iter 2 is the image of seed + k run alone."""
    url = servers["plain"].url + "/sdapi/v1/txt2img"
    body = {"prompt": "a boat", "seed": 40, "width": 64, "height": 64, "steps": STEPS, "cfg_scale": 7.0}
    batch = httpx.post(url, json={**body, "batch_size": 4, "n_iter": 2}, timeout=120).json()
    assert json.loads(batch["info"])["all_seeds"] == list(range(40, 48))
    for k, image in enumerate(batch["images"]):
        alone = httpx.post(url, json={**body, "seed": 40 + k}, timeout=120).json()["images"][0]
        assert np.array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(image)))),
                              pixels(Image.open(io.BytesIO(base64.b64decode(alone)))))


@pytest.mark.slow
def test_sd_model_checkpoint_switches_the_model(sd1):
    """options' sd_model_checkpoint loads the other model on the worker; switching back gives the same image."""
    model = str(sd1[1])  # (the diffusers pipeline, its folder)
    settings = ServerSettings(model=model)
    engine = Engine(settings)
    engine.call(lambda e: e.load(model))
    running = Running(create_app(settings, engine))
    try:
        api = webuiapi.WebUIApi(port=running.port, sampler="Euler a", steps=STEPS)
        assert set(api.util_get_model_names()) == {model, DEMO_MODEL_ID}
        first = pixels(api.txt2img(prompt="a cat", seed=1, **FAST).image)
        api.util_set_model(DEMO_MODEL_ID, find_closest=False)
        assert api.util_get_current_model() == DEMO_MODEL_ID
        demo = pixels(api.txt2img(prompt="a cat", seed=1, **FAST).image)
        assert np.array_equal(demo, direct(engine, "txt2img", prompt="a cat", seed=1))
        api.util_set_model(model, find_closest=False)
        assert np.array_equal(pixels(api.txt2img(prompt="a cat", seed=1, **FAST).image), first)
        assert not np.array_equal(first, demo)
    finally:
        running.stop()
        engine.close()


@pytest.mark.slow
def test_an_sdxl_model_is_served(sdxl):
    """The tiny SDXL base through A1111's txt2img and img2img equals its pipelines called directly."""
    model = str(sdxl[1])
    settings = ServerSettings(model=model)
    engine = Engine(settings)
    engine.call(lambda e: e.load(model))
    running = Running(create_app(settings, engine))
    try:
        api = webuiapi.WebUIApi(port=running.port, sampler="Euler a", steps=STEPS)
        image = api.txt2img(prompt="a cat", seed=1, **FAST).image
        assert np.array_equal(pixels(image), direct(engine, "txt2img", prompt="a cat", seed=1))
        edited = api.img2img(images=[image], prompt="a dog", seed=2, denoising_strength=0.5, **FAST).image
        assert np.array_equal(pixels(edited), direct(engine, "img2img", image=image, prompt="a dog", strength=0.5,
                                                     seed=2))
    finally:
        running.stop()
        engine.close()
