"""stablefused 0.2.0 as a drop-in: the three calls that crashed (regressions), and stablefused's own tests
re-expressed with only the import and the tiny model changed, on both backends."""

import numpy as np
import pytest
import torch
from helpers import max_abs_error, report

from mlx_stablefused import LatentWalkDiffusion, TextToImageDiffusion


def native_type(backend_name):
    import mlx.core as mx

    return mx.array if backend_name == "mlx" else torch.Tensor


# ------------------------------------------------------------------------------ the three crashes
def test_image_to_latent_is_diffusers_layout_and_feeds_back_as_latent(sd1, pipelines, backend_name):
    """A non-square image's latent is a native (B, 4, h, w) array on every backend (MLX handed out NHWC),
    equal to diffusers' posterior mean; fed back as ``latent=`` it gives the numpy latent's images."""
    pipe, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    pixels = np.random.default_rng(0).random((1, 48, 64, 3)).astype(np.float32)
    latent = t2i.image_to_latent(pixels)
    assert isinstance(latent, native_type(backend_name)) and tuple(latent.shape) == (1, 4, 6, 8)
    with torch.no_grad():
        mean = pipe.vae.encode(torch.from_numpy(pixels.transpose(0, 3, 1, 2) * 2 - 1)).latent_dist.mean
    ref = mean.numpy() * pipe.vae.config.scaling_factor
    as_np = np.asarray(latent.cpu() if backend_name == "torch" else latent)
    assert report(f"image_to_latent vs diffusers' posterior mean (max abs) [{backend_name}]",
                  max_abs_error(as_np, ref)) < 1e-4
    walk = LatentWalkDiffusion.from_pipeline(t2i)
    args = dict(prompt="a cat", num_inference_steps=1, output_type="np", seed=0)
    np.testing.assert_array_equal(walk(latent=latent, **args), walk(latent=as_np, **args))
    assert walk(latent=latent, **args).shape == (1, 48, 64, 3)
    np.testing.assert_array_equal(t2i.latent_to_image(latent, "np"), t2i.latent_to_image(as_np, "np"))


def test_pt_output_with_latent_history(sd1, pipelines):
    """stablefused's test_return_latent_history on torch: (B, steps+1, 3, H, W), the "np" history's pixels."""
    _, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root, "torch", scheduler="ddim")
    args = dict(prompt=["a", "b"], image_height=48, image_width=64, num_inference_steps=2, seed=0,
                return_latent_history=True)
    pt = t2i(output_type="pt", **args)
    assert isinstance(pt, torch.Tensor) and tuple(pt.shape) == (2, 3, 3, 48, 64)
    np.testing.assert_allclose(pt.cpu().numpy().transpose(0, 1, 3, 4, 2), t2i(output_type="np", **args), atol=1e-6)


def test_attention_slicing_takes_stablefused_and_diffusers_arguments(sd1, pipelines):
    """-1 (stablefused's default) and "auto" slice; "max", 0 and -2 are refused at the call, not mid-run."""
    _, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim")
    args = dict(prompt="a", image_height=64, image_width=64, num_inference_steps=1, seed=0, output_type="np")
    plain = t2i(**args)
    for size in (-1, "auto"):
        t2i.enable_attention_slicing(size)
        assert t2i.settings.attention_chunk == 1024
    t2i.enable_attention_slicing(5)  # a pipeline setting: in force only during this pipeline's calls
    np.testing.assert_allclose(t2i(**args), plain, atol=1e-5)
    for bad in ("max", 0, -2, 2.5, "half"):
        with pytest.raises((ValueError, TypeError), match="slice_size"):
            t2i.enable_attention_slicing(bad)
    t2i.disable_attention_slicing()
    assert t2i.settings.attention_chunk is None


# ------------------------------------------------------------------------------ the API surface
STABLEFUSED_0_2_0_NAMES = (  # stablefused/__init__.py at v0.2.0
    "BaseDiffusion ImageToImageDiffusion InpaintDiffusion LatentWalkDiffusion TextToImageDiffusion "
    "TextToVideoDiffusion InpaintWalkType Scheduler ImageType OutputType PromptType SchedulerType UNetType "
    "denormalize image_grid lerp load_model_from_cache normalize numpy_to_pil numpy_to_pt pil_to_numpy "
    "pil_to_video pil_to_gif pt_to_numpy resolve_scheduler save_model_to_cache slerp").split()
STABLEFUSED_UTILS = ("lerp resolve_scheduler slerp denormalize image_grid normalize numpy_to_pil numpy_to_pt "
                     "pil_to_numpy pil_to_video pil_to_gif pt_to_numpy save_model_to_cache load_model_from_cache").split()
STABLEFUSED_SCHEDULERS = ("deis ddim ddpm dpm2_karras dpm2_karras_ancestral dpm_sde dpm_sde_karras dpm_multistep "
                          "dpm_multistep_karras dpm_singlestep dpm_singlestep_karras euler euler_ancestral heun "
                          "linear_multistep pndm unipc").split()


def test_every_stablefused_name_is_there():
    import mlx_stablefused
    import mlx_stablefused.utils
    from mlx_stablefused import InpaintWalkType, Scheduler, resolve_scheduler

    assert [n for n in STABLEFUSED_0_2_0_NAMES if n not in mlx_stablefused.__all__] == []
    assert [n for n in STABLEFUSED_UTILS if not hasattr(mlx_stablefused.utils, n)] == []
    for name in STABLEFUSED_SCHEDULERS:
        assert Scheduler[name.upper()] == name  # a str enum, as stablefused's
        assert type(resolve_scheduler(Scheduler[name.upper()], {})).__name__.endswith("Scheduler")
    assert InpaintWalkType.BACKWARD == "backward"


def test_interpolation_returns_the_type_it_was_given():
    import mlx.core as mx

    from mlx_stablefused.utils import lerp, slerp

    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    t = np.array([0.5, 0.25])
    expected = {lerp: [[0.5, 0.5], [0.75, 0.25]], slerp: [[0.707107, 0.707107], [0.923880, 0.382683]]}
    for fn, want in expected.items():
        for wrap, kind in ((np.asarray, np.ndarray), (mx.array, mx.array), (torch.from_numpy, torch.Tensor)):
            out = fn(wrap(a), wrap(b), t)
            assert isinstance(out, kind), (fn.__name__, kind)
            np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)
        assert isinstance(fn(a, b, torch.tensor(t)), torch.Tensor)  # stablefused: any torch input -> torch


def test_stablefused_constructor_spellings(sd1, pipelines, tmp_path):
    """``torch_dtype=``, a diffusers scheduler object, and the five components as diffusers objects
    (read into this port's networks) give what the plain spellings give."""
    import diffusers

    pipe, root = sd1
    plain = pipelines.pipeline(TextToImageDiffusion, root, scheduler="euler")
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    injected = TextToImageDiffusion(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                    unet=pipe.unet, scheduler=euler, torch_dtype=torch.float32, progress=False)
    assert injected.scheduler_name == "euler" and injected.scheduler.config["timestep_spacing"] == "trailing"
    plain.set_scheduler("euler", timestep_spacing="trailing")
    args = dict(prompt="a", image_height=64, image_width=64, num_inference_steps=2, seed=0, output_type="np")
    np.testing.assert_array_equal(injected(**args), plain(**args))
    with pytest.raises(ValueError, match="must be provided; missing: vae, unet"):
        TextToImageDiffusion(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, scheduler=euler)
    with pytest.raises(ValueError, match="disagree"):
        TextToImageDiffusion(root, dtype="float16", torch_dtype=torch.float32)


@pytest.mark.parametrize("backend_name", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])
def test_stablefused_building_blocks(sd1, pipelines, backend_name):
    """random_tensor, to, share_components_with, interpolate_embedding/_latent (stablefused's inclusive
    pairwise weights), preprocess_image_and_mask, resolve_output(latent=), classifier_free_guidance keyword,
    and output_type="pt" on MLX: each against its numpy / torch-tensor definition."""
    from mlx_stablefused import ImageToImageDiffusion, InpaintDiffusion, lerp, slerp
    from mlx_stablefused.backends.base import as_numpy

    pipe, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    noise = t2i.random_tensor((2, 4, 8, 8), seed=3)
    assert isinstance(noise, native_type(backend_name))
    np.testing.assert_array_equal(as_numpy(noise), np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32))
    assert t2i.to("cpu") is t2i
    i2i = pipelines.pipeline(ImageToImageDiffusion, root, backend_name)
    i2i.share_components_with(t2i)
    assert i2i.backend is t2i.backend and i2i.scheduler_name == "ddim"

    walk = LatentWalkDiffusion.from_pipeline(t2i)
    embedding = t2i.prompt_to_embedding(["a", "b", "c"])
    frames = walk.interpolate_embedding(embedding, 3, "lerp")
    e, w = as_numpy(embedding), np.linspace(0, 1, 3)
    want = np.concatenate([lerp(e[0], e[1], w), lerp(e[1], e[2], w), lerp(e[3], e[4], w), lerp(e[4], e[5], w)])
    assert isinstance(frames, native_type(backend_name)) and tuple(frames.shape) == (12, 77, e.shape[-1])
    np.testing.assert_allclose(as_numpy(frames), want, atol=1e-6)
    z = as_numpy(noise)
    np.testing.assert_allclose(as_numpy(walk.interpolate_latent(noise, 4, "slerp")), slerp(z[0], z[1], np.linspace(0, 1, 4)),
                               atol=1e-6)

    inpaint = pipelines.pipeline(InpaintDiffusion, root, backend_name)
    pixels = np.random.default_rng(1).random((1, 16, 24, 3)).astype(np.float32)
    mask = np.zeros((16, 24), np.uint8)
    mask[:, :10] = 255
    image, m, masked = (as_numpy(x) for x in inpaint.preprocess_image_and_mask(pixels, mask))
    np.testing.assert_allclose(image, pixels.transpose(0, 3, 1, 2) * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(m[0, 0], mask / 255)
    np.testing.assert_allclose(masked, image * (1 - m), atol=1e-6)

    history = t2i.embedding_to_latent(t2i.prompt_to_embedding("a"), 64, 64, 2, 7.5, 0.0, return_latent_history=True,
                                      seed=0)
    stacked = np.stack([t2i.backend.latent_to_numpy(x) for x in history])  # stablefused's (steps+1, B, C, h, w)
    np.testing.assert_array_equal(t2i.resolve_output(latent=stacked, output_type="np", return_latent_history=True),
                                  t2i.resolve_output(history, "np", True))
    pred = t2i.random_tensor((2, 4, 8, 8), seed=4)
    np.testing.assert_array_equal(as_numpy(t2i.classifier_free_guidance(noise_prediction=pred, guidance_scale=3.0,
                                                                        guidance_rescale=0.0)),
                                  as_numpy(pred)[:1] + 3.0 * (as_numpy(pred)[1:] - as_numpy(pred)[:1]))
    args = dict(prompt="a", image_height=48, image_width=64, num_inference_steps=1, seed=0)
    pt = t2i(output_type="pt", **args)
    assert isinstance(pt, torch.Tensor) and tuple(pt.shape) == (1, 3, 48, 64)
    np.testing.assert_allclose(pt.cpu().numpy().transpose(0, 2, 3, 1), t2i(output_type="np", **args), atol=1e-6)


def test_torch_image_tensors_are_read_as_diffusers_reads_them(sd1, pipelines):
    """A (B, 3, H, W) tensor with negative values is the VAE's [-1, 1] input as is (stablefused fed it so):
    its latent is diffusers' posterior mean of that tensor; one in [0, 1] is mapped to [-1, 1]."""
    pipe, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root)
    image = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 3, 32, 40)).astype(np.float32)) * 0.5
    with torch.no_grad():
        ref = pipe.vae.encode(image).latent_dist.mean.numpy() * pipe.vae.config.scaling_factor
    assert max_abs_error(np.asarray(t2i.image_to_latent(image)), ref) < 1e-4
    unit = (image.clamp(-1, 1) + 1) / 2
    np.testing.assert_allclose(np.asarray(t2i.image_to_latent(unit)),
                               np.asarray(t2i.image_to_latent(unit.numpy().transpose(0, 2, 3, 1))), atol=1e-5)


# --------------------------------------------- stablefused 0.2.0's own tests (tests/diffusion, tests/utils)
# The bodies are stablefused's. Changed: the import; ``model`` builds our pipeline on the tiny model (the
# session's cached components, each backend in turn, DDIM: a sampler with num_inference_steps timesteps,
# which the history lengths below assume); and ``interpolate`` passes ``duplicate_endpoints=True`` for
# stablefused's frame count (see "Migrating from stablefused"). The torch variants run with -m slow: the
# pipelines are backend-neutral and the MLX-vs-torch parity tests cover both.
SF_BACKENDS = [pytest.param("mlx"), pytest.param("torch", marks=pytest.mark.slow)]


@pytest.fixture(params=SF_BACKENDS)
def sf_model(request, sd1, pipelines):
    def make(cls):
        seed = 1337
        torch.manual_seed(seed)
        np.random.seed(seed)
        return pipelines.pipeline(cls, sd1[1], request.param, scheduler="ddim")  # (model_id=..., device="cpu")

    return make


@pytest.fixture
def sf_config():
    return {"prompt": "a photo of a cat", "num_inference_steps": 1, "image_dim": 32}


def test_sf_text_to_image_diffusion(sf_model, sf_config):
    from mlx_stablefused import TextToImageDiffusion

    model, config = sf_model(TextToImageDiffusion), sf_config
    dim = config.get("image_dim")
    images = model(prompt=config.get("prompt"), image_height=dim, image_width=dim,
                   num_inference_steps=config.get("num_inference_steps"), output_type="np")
    assert type(images) is np.ndarray
    assert images.shape == (1, dim, dim, 3)
    # test_return_latent_history
    images = model(prompt=config.get("prompt"), image_height=dim, image_width=dim,
                   num_inference_steps=config.get("num_inference_steps"), output_type="pt", return_latent_history=True)
    assert type(images) is torch.Tensor
    assert images.shape == (1, config.get("num_inference_steps") + 1, 3, dim, dim)
    # test_no_classifier_free_guidance (0.2.0)
    images = model(prompt=config.get("prompt"), image_height=dim, image_width=dim,
                   num_inference_steps=config.get("num_inference_steps"), guidance_scale=1.0, output_type="np")
    assert images.shape == (1, dim, dim, 3)


def test_sf_image_to_image_diffusion(sf_model, sf_config):
    from mlx_stablefused import ImageToImageDiffusion

    model, config = sf_model(ImageToImageDiffusion), {**sf_config, "num_inference_steps": 2, "start_step": 1}
    dim = config.get("image_dim")
    image = model.random_tensor((1, 3, dim, dim))
    images = model(image=image, prompt=config.get("prompt"), num_inference_steps=config.get("num_inference_steps"),
                   output_type="np")
    assert type(images) is np.ndarray
    assert images.shape == (1, dim, dim, 3)
    # test_return_latent_history
    images = model(image=image, prompt=config.get("prompt"), num_inference_steps=config.get("num_inference_steps"),
                   start_step=config.get("start_step"), output_type="pt", return_latent_history=True)
    assert type(images) is torch.Tensor
    assert images.shape == (1, config.get("num_inference_steps") + 1 - config.get("start_step"), 3, dim, dim)
    # test_no_classifier_free_guidance (0.2.0)
    images = model(image=image, prompt=config.get("prompt"), num_inference_steps=config.get("num_inference_steps"),
                   guidance_scale=1.0, output_type="np")
    assert images.shape == (1, dim, dim, 3)


def test_sf_latent_walk_diffusion(sf_model, sf_config):
    model, config = sf_model(LatentWalkDiffusion), sf_config
    dim = config.get("image_dim")
    image = model.random_tensor((1, 3, dim, dim))
    latent = model.image_to_latent(image)
    images = model(prompt=config.get("prompt"), latent=latent, num_inference_steps=config.get("num_inference_steps"),
                   output_type="np")
    assert type(images) is np.ndarray
    assert images.shape == (1, dim, dim, 3)
    # test_interpolate
    prompt = ["a photo of a cat", "a photo of a dog"]
    latent = model.image_to_latent(model.random_tensor((len(prompt), 3, dim, dim)))
    interpolation_steps = 5
    images = model.interpolate(prompt=prompt, latent=latent, num_inference_steps=config.get("num_inference_steps"),
                               interpolation_steps=interpolation_steps, output_type="np", duplicate_endpoints=True)
    assert type(images) is np.ndarray
    assert images.shape == (interpolation_steps * (len(prompt) - 1), dim, dim, 3)
    # test_no_classifier_free_guidance (0.2.0)
    images = model(prompt=config.get("prompt"), latent=latent[:1], num_inference_steps=1, guidance_scale=1.0,
                   output_type="np")
    assert images.shape == (1, dim, dim, 3)


SF_LERP = [  # tests/utils/test_diffusion_utils.py
    (np.array([1.0, 2.0]), np.array([4.0, 6.0]), 0.0, np.array([1.0, 2.0])),
    (np.array([1.0, 2.0]), np.array([4.0, 6.0]), 1.0, np.array([4.0, 6.0])),
    (np.array([1.0, 2.0]), np.array([4.0, 6.0]), 0.5, np.array([2.5, 4.0])),
    (np.array([1.0, 2.0]), np.array([4.0, 6.0]), np.array([0.0, 1.0]), np.array([[1.0, 2.0], [4.0, 6.0]])),
    (np.array([1.0, 2.0]), np.array([4.0, 6.0]), np.array([0.5, 0.25]), np.array([[2.5, 4.0], [1.75, 3.0]])),
    (np.array([1.0, 2.0]), np.array([4.0, 6.0]), torch.Tensor([0.0, 1.0]), np.array([[1.0, 2.0], [4.0, 6.0]])),
    (np.array([1.0, 2.0]), np.array([4.0, 6.0]), torch.Tensor([0.5, 0.25]), np.array([[2.5, 4.0], [1.75, 3.0]])),
]
SF_SLERP = [
    (np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.0, np.array([1.0, 0.0])),
    (np.array([1.0, 0.0]), np.array([0.0, 1.0]), 1.0, np.array([0.0, 1.0])),
    (np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.5, np.array([0.707107, 0.707107])),
    (np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([[1.0, 0.0], [0.0, 1.0]])),
    (np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.5, 0.25]),
     np.array([[0.707107, 0.707107], [0.923880, 0.382683]])),
    (np.array([1.0, 0.0]), np.array([0.0, 1.0]), torch.Tensor([0.0, 1.0]), np.array([[1.0, 0.0], [0.0, 1.0]])),
    (np.array([1.0, 0.0]), np.array([0.0, 1.0]), torch.Tensor([0.5, 0.25]),
     np.array([[0.707107, 0.707107], [0.923880, 0.382683]])),
]


@pytest.mark.parametrize("v0, v1, t, expected", SF_LERP)
def test_sf_lerp(v0, v1, t, expected):
    from mlx_stablefused.utils import lerp

    result = lerp(v0, v1, t)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("v0, v1, t, expected", SF_SLERP)
def test_sf_slerp(v0, v1, t, expected):
    from mlx_stablefused.utils import slerp

    v0_torch = torch.from_numpy(v0)
    v1_torch = torch.from_numpy(v1)
    result = slerp(v0, v1, t)
    result_torch = slerp(v0_torch, v1_torch, t).cpu().numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(result_torch, expected, rtol=1e-5, atol=1e-8)


@pytest.fixture
def sf_random_images():  # tests/utils/test_image_utils.py: 8 random 32x32 RGB images
    from PIL import Image

    rng = np.random.RandomState(42)
    return [Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]


def test_sf_image_grid_and_gif(sf_random_images, tmp_path):
    from PIL import Image

    from mlx_stablefused.utils import image_grid, pil_to_gif

    random_images, num_images = sf_random_images, 8
    rows, cols = 2, num_images // 2
    grid_image = image_grid(random_images, rows, cols)
    assert grid_image.width == random_images[0].width * cols
    assert grid_image.height == random_images[0].height * rows
    assert isinstance(grid_image, Image.Image)
    temporary_gif_file = str(tmp_path / "x.gif")
    pil_to_gif(random_images, temporary_gif_file, fps=1)
    with Image.open(temporary_gif_file) as saved_gif:
        assert saved_gif.is_animated
        assert saved_gif.n_frames == len(random_images)


@pytest.mark.parametrize("suffix", [".mp4"] + [pytest.param(s, marks=pytest.mark.slow)
                                               for s in (".avi", ".mkv", ".mov", ".wmv")])
def test_sf_pil_to_video(sf_random_images, tmp_path, suffix):
    import imageio

    from mlx_stablefused.utils import pil_to_video

    temporary_video_file = str(tmp_path / f"x{suffix}")
    pil_to_video(sf_random_images, temporary_video_file, fps=1)
    video = imageio.get_reader(temporary_video_file, format="ffmpeg")
    assert video.count_frames() == len(sf_random_images)
