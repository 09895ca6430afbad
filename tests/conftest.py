import os
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_stablefused.backends.mlx  # noqa: F401  (first, so the OpenBLAS preload precedes any mlx import)

sys.path.insert(0, str(Path(__file__).parent))

BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "data" / "clip-tokenizer"


def _real_clip_vocabulary() -> Path:
    """The real CLIP vocabulary: unpacked from tests/data (gzipped there) into a temp folder once."""
    import gzip
    import tempfile

    target = Path(tempfile.gettempdir()) / "mlx-stablefused-test-clip-tokenizer"
    if not (target / "merges.txt").is_file():
        target.mkdir(exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            with gzip.open(BUNDLED_TOKENIZER / f"{name}.gz", "rb") as src:
                data = src.read()
            tmp = target / f".{name}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, target / name)
    return target


SHARED_TOKENIZER = _real_clip_vocabulary()


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Converted-model cache in a temp dir, so tests never touch (or depend on) the user's cache."""
    os.environ["MLX_STABLEFUSED_CACHE"] = str(tmp_path_factory.mktemp("msf-cache"))
    yield


@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    from tiny_models import SD1, build_pipeline

    folder = tmp_path_factory.mktemp("sd1")
    pipe = build_pipeline(SD1, folder)
    return pipe, folder / "model"


@pytest.fixture(scope="session")
def sd2(tmp_path_factory):
    from tiny_models import SD2, build_pipeline

    folder = tmp_path_factory.mktemp("sd2")
    pipe = build_pipeline(SD2, folder)
    return pipe, folder / "model"


@pytest.fixture(scope="session")
def sd1_inpaint(tmp_path_factory):
    """The SD1-style tiny model with a 9-channel inpainting UNet, as StableDiffusionInpaintPipeline."""
    from tiny_models import INPAINT_UNET, SD1, build_pipeline

    folder = tmp_path_factory.mktemp("sd1-inpaint")
    pipe = build_pipeline(SD1, folder, unet=INPAINT_UNET, pipeline_class="StableDiffusionInpaintPipeline")
    return pipe, folder / "model"


@pytest.fixture(scope="session")
def unet3d_model(tmp_path_factory):
    """A ModelScope-style text-to-video model (UNet3D), as TextToVideoSDPipeline."""
    from tiny_models import build_video_pipeline

    folder = tmp_path_factory.mktemp("unet3d")
    return build_video_pipeline(folder), folder / "model"


BACKEND_NAMES = ["mlx", "torch"]


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request):
    """Each backend in turn; tests that need CUDA or MPS mark themselves and skip where absent."""
    return request.param


@pytest.fixture(params=["sd1", "sd2"])
def tiny(request):
    """Each tiny configuration in turn: (diffusers pipeline, saved folder)."""
    return request.getfixturevalue(request.param)


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))


PARITY: dict[str, float] = {}


def report(name: str, value: float) -> float:
    """Record a measured parity error; the worst per name is printed at the end of the run."""
    PARITY[name] = max(PARITY.get(name, 0.0), float(value))
    return float(value)


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("parity: worst measured error per check")
        for name in sorted(PARITY):
            terminalreporter.write_line(f"{name:<55} {PARITY[name]:.2e}")
