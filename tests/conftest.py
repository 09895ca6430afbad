"""Fixtures only: the isolated environment, the tiny models (built once per session), the session cache of
our loaded pipelines, and the parity summary. Shared code lives in helpers.py and tiny_models.py."""

import pytest

import mlx_stablefused.backends.mlx  # noqa: F401  (first, so the OpenBLAS preload precedes any mlx import)

import helpers  # noqa: E402  (tests/ is on sys.path: pyproject's pythonpath)

import os  # noqa: E402

# Tests that build a pipeline without backend= (and the CLI and examples they run) mean the MLX backend, as
# the default was before backend="auto": pinned here, for every worker and subprocess, so the suite means the
# same on every machine. The auto rule itself is tested in test_auto_backend.py with this variable removed.
os.environ["MLX_STABLEFUSED_BACKEND"] = "mlx"


# --------------------------------------------------------------------------------- environment
@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Converted-model cache in a temp dir (tests never touch, or depend on, the user's cache) and two torch
    threads (the tiny models gain nothing from more; one per xdist worker, whose siblings use the other
    cores); both restored when the session ends."""
    import torch

    import os

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_STABLEFUSED_CACHE", str(tmp_path_factory.mktemp("msf-cache")))
        torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


# Set by pytest per phase, and by torch the first time diffusers imports its compiler stack: not a test's doing.
NOT_OWNED_BY_TESTS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def _global_state() -> dict:
    import os

    import mlx.core as mx
    import torch

    environ = {k: v for k, v in os.environ.items() if k not in NOT_OWNED_BY_TESTS}
    return {"os.environ": environ, "torch threads": torch.get_num_threads(),
            "torch default dtype": torch.get_default_dtype(), "MLX default device": mx.default_device()}


@pytest.fixture(autouse=True)
def _restores_global_state():
    """A test must leave the process as it found it (use monkeypatch): restore and fail loudly otherwise."""
    import os

    import mlx.core as mx
    import torch

    before = _global_state()
    yield
    after = _global_state()
    changed = [name for name in before if after[name] != before[name]]
    if changed:
        for key in set(os.environ) - set(before["os.environ"]) - NOT_OWNED_BY_TESTS:
            del os.environ[key]
        os.environ.update(before["os.environ"])
        torch.set_num_threads(before["torch threads"])
        torch.set_default_dtype(before["torch default dtype"])
        mx.set_default_device(before["MLX default device"])
        pytest.fail(f"the test changed process-wide state and did not restore it: {', '.join(changed)}")


# --------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    """The SD1-style tiny model: (diffusers StableDiffusionPipeline, its saved folder)."""
    from tiny_models import SD1, build_pipeline

    folder = tmp_path_factory.mktemp("sd1")
    return build_pipeline(SD1, folder), folder / "model"


@pytest.fixture(scope="session")
def sd2(tmp_path_factory):
    """The SD2-style tiny model (linear projections, v-prediction): (pipeline, folder)."""
    from tiny_models import SD2, build_pipeline

    folder = tmp_path_factory.mktemp("sd2")
    return build_pipeline(SD2, folder), folder / "model"


@pytest.fixture(scope="session")
def sd1_inpaint(tmp_path_factory):
    """The SD1-style tiny model with a 9-channel inpainting UNet, as StableDiffusionInpaintPipeline."""
    from tiny_models import INPAINT_UNET, SD1, build_pipeline

    folder = tmp_path_factory.mktemp("sd1-inpaint")
    pipe = build_pipeline(SD1, folder, unet=INPAINT_UNET, pipeline_class="StableDiffusionInpaintPipeline")
    return pipe, folder / "model"


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    """The tiny SDXL base model (two text encoders, text_time UNet): (StableDiffusionXLPipeline, folder)."""
    from tiny_sdxl import BASE, build_sdxl

    folder = tmp_path_factory.mktemp("sdxl")
    return build_sdxl(BASE, folder), folder / "model"


@pytest.fixture(scope="session")
def sdxl_refiner(tmp_path_factory):
    """The tiny SDXL refiner (second text encoder only, aesthetic score): (StableDiffusionXLImg2ImgPipeline, folder)."""
    from tiny_sdxl import REFINER, build_sdxl

    folder = tmp_path_factory.mktemp("sdxl-refiner")
    return build_sdxl(REFINER, folder), folder / "model"


@pytest.fixture(scope="session")
def sdxl_inpaint(tmp_path_factory):
    """The tiny SDXL model with a 9-channel inpainting UNet: (StableDiffusionXLInpaintPipeline, folder)."""
    from tiny_sdxl import INPAINT, build_sdxl

    folder = tmp_path_factory.mktemp("sdxl-inpaint")
    return build_sdxl(INPAINT, folder), folder / "model"


@pytest.fixture(scope="session")
def unet3d_model(tmp_path_factory):
    """A ModelScope-style text-to-video model (UNet3D), as TextToVideoSDPipeline."""
    from tiny_models import build_video_pipeline

    folder = tmp_path_factory.mktemp("unet3d")
    return build_video_pipeline(folder), folder / "model"


@pytest.fixture(scope="session")
def motion_adapters(tmp_path_factory):
    """Tiny AnimateDiff adapters fitting sd1, with and without a motion mid block: {mid_block: (adapter, folder)}."""
    from tiny_models import build_motion_adapter

    out = {}
    for mid_block in (True, False):
        adapter = build_motion_adapter(mid_block)
        folder = tmp_path_factory.mktemp("adapter-mid" if mid_block else "adapter-no-mid")
        adapter.save_pretrained(str(folder), safe_serialization=True)
        out[mid_block] = adapter, folder
    return out


@pytest.fixture(scope="session")
def clip_vocabulary(tmp_path_factory):
    """A folder with the real CLIP vocabulary (vocab.json, merges.txt)."""
    return helpers.unpack_clip_vocabulary(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def pipelines():
    """The session cache of our loaded pipelines (helpers.PipelineCache), shared by every test file."""
    return helpers.PipelineCache()


@pytest.fixture(params=helpers.BACKENDS)
def backend_name(request):
    """Each backend in turn; tests that need CUDA or MPS mark themselves and skip where absent."""
    return request.param


@pytest.fixture(params=["sd1", "sd2"])
def tiny(request):
    """Each tiny configuration in turn: (diffusers pipeline, saved folder)."""
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------------ summary
# The default run is spread over the cores by pytest-xdist (``-n auto`` in pyproject). Workers measure; the
# controller (or the one process without xdist) receives every report and prints both summaries.
SECONDS_PER_FILE: dict = {}  # test file -> seconds in setup, call and teardown (the default run's budget: 4 min)
MAX_WORKERS = 4  # each worker holds its own tiny models, torch and diffusers (~1.5 GB): more buys little
_PARITY_SENT: dict = {}  # what this process's reports already carried


def pytest_xdist_auto_num_workers(config):
    import os

    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                      MAX_WORKERS))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the parity errors measured since the last report to this one, which xdist carries to the controller."""
    outcome = yield
    measured = {k: v for k, v in helpers.PARITY.items() if _PARITY_SENT.get(k) != v}
    _PARITY_SENT.update(measured)
    if measured:
        outcome.get_result().user_properties.append(("parity", measured))


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    SECONDS_PER_FILE[path] = SECONDS_PER_FILE.get(path, 0.0) + report.duration
    for key, value in report.user_properties:
        if key == "parity":
            for name, error in value.items():
                helpers.report(name, error)


def pytest_terminal_summary(terminalreporter):
    if SECONDS_PER_FILE:
        terminalreporter.section("seconds per test file (summed over workers)")
        for path, seconds in sorted(SECONDS_PER_FILE.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    if helpers.PARITY:
        terminalreporter.section("parity: worst measured error per check")
        for name in sorted(helpers.PARITY):
            terminalreporter.write_line(f"{name:<55} {helpers.PARITY[name]:.2e}")
