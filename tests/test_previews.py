"""Previews: TAESD (vs diffusers' AutoencoderTiny, decode and encode, both backends), the linear latent-to-RGB
approximation (vs AUTOMATIC1111's formula), PreviewCallback on the step-callback API, and cheap
``return_latent_history`` decoders (the default "vae" path unchanged, bit for bit)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import max_abs_error, rel_error, report
from tiny_models import randomize

# Every layer kind of TAESD (stride-2 convs, residual blocks, nearest upsampling, a biased last conv) at a few
# channels; 4-channel latents at 1/8 scale, as the SD1 tiny model's VAE.
TINY_TAESD = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 2, 1, 1), latent_channels=4)


@pytest.fixture(scope="session")
def taesd(tmp_path_factory):
    """A random-weight diffusers AutoencoderTiny and its saved folder."""
    from diffusers import AutoencoderTiny

    model = randomize(AutoencoderTiny(**TINY_TAESD), seed=21)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    model.save_pretrained(str(folder), safe_serialization=True)
    return model, folder


@pytest.fixture
def with_taesd(pipelines, sd1, taesd):
    """A factory of SD1 pipelines (cached networks) with the tiny autoencoder loaded; removed afterwards, so
    the session's shared networks are as other tests expect them."""
    from mlx_stablefused import TextToImageDiffusion
    from mlx_stablefused.tiny_autoencoder import COMPONENT

    loaded = []

    def make(backend, scheduler="ddim"):
        pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], backend=backend, scheduler=scheduler)
        pipe.load_tiny_autoencoder(taesd[1])
        loaded.append(pipe.backend)
        return pipe

    yield make
    for backend in loaded:
        backend.components.pop(COMPONENT, None)
        backend.configs.pop(COMPONENT, None)


def test_taesd_decode_and_encode_match_diffusers(with_taesd, taesd, backend_name):
    from mlx_stablefused.tiny_autoencoder import tiny_decode, tiny_encode

    backend = with_taesd(backend_name).backend
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)  # odd sizes; tanh clamp exercised (|z| > 3)
    latents[0, 0, 0, 0] = 6.0
    with torch.no_grad():
        ref = taesd[0].decode(torch.from_numpy(latents)).sample.permute(0, 2, 3, 1).numpy()
    module = backend.components["tiny_vae"]
    raw = backend.images_to_numpy(module.decode(backend.latent_from_numpy(latents)))
    assert report(f"TAESD decode vs AutoencoderTiny ({backend_name})", rel_error(raw, ref)) < 1e-5
    if backend_name == "mlx":  # MLX's CPU build: row bands on two CPU streams vs one stream
        from mlx_stablefused.backends.mlx.cpu_streams import StreamSet

        previous = module.stream_set
        try:
            module.set_stream_set(StreamSet(2))
            banded = backend.images_to_numpy(module.decode(backend.latent_from_numpy(latents)))
            module.set_stream_set(None)
            single = backend.images_to_numpy(module.decode(backend.latent_from_numpy(latents)))
        finally:
            module.set_stream_set(previous)
        assert max_abs_error(banded, single) < 1e-6 and rel_error(banded, ref) < 1e-5
    images = tiny_decode(backend, backend.latent_from_numpy(latents))
    assert max_abs_error(images, np.clip(ref / 2 + 0.5, 0, 1)) < 1e-5

    pixels = rng.uniform(0, 1, (2, 40, 56, 3)).astype(np.float32)
    with torch.no_grad():
        ref_latent = taesd[0].encode(torch.from_numpy(pixels * 2 - 1).permute(0, 3, 1, 2)).latents.numpy()
    ours = backend.latent_to_numpy(tiny_encode(backend, pixels))
    assert report(f"TAESD encode vs AutoencoderTiny ({backend_name})", rel_error(ours, ref_latent)) < 1e-5


def test_linear_approximation_is_automatic1111s():
    from mlx_stablefused.previews import SD15_LATENT_RGB_FACTORS, latents_to_rgb

    latents = np.random.default_rng(4).standard_normal((2, 4, 6, 5)).astype(np.float32) * 2
    # stable-diffusion-webui: cheap_approximation (einsum "...lxy,lr -> ...rxy"), then (x + 1) / 2 clamped.
    coefs = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                          [-0.184, -0.271, -0.473]])
    ref = torch.clamp((torch.einsum("...lxy,lr -> ...rxy", torch.from_numpy(latents), coefs) + 1) / 2, 0, 1)
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert np.abs(SD15_LATENT_RGB_FACTORS - coefs.numpy()).max() == 0
    assert report("linear latent-to-RGB vs A1111's cheap approximation",
                  max_abs_error(latents_to_rgb(latents), ref)) < 1e-6
    big = latents_to_rgb(latents, upscale=8)
    assert big.shape == (2, 48, 40, 3) and np.array_equal(big[:, ::8, ::8], latents_to_rgb(latents))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        latents_to_rgb(latents[:, :3])


def test_previews_and_history_decoders_against_diffusers(with_taesd, taesd):
    """One 3-step run per decoder on MLX: previews every second step and history frames are TAESD / linear
    decodes (vs diffusers' AutoencoderTiny) of exactly the latents the default run gives; "vae" is unchanged."""
    from mlx_stablefused.previews import PreviewCallback, latents_to_rgb

    pipe = with_taesd("mlx")
    run = dict(prompt="a red fox", num_inference_steps=3, guidance_scale=7.5, seed=0, image_height=40,
               image_width=56)
    history = pipe(**run, output_type="latent", return_latent_history=True)  # (1, 4, 4, 5, 7)
    with torch.no_grad():
        ref = taesd[0].decode(torch.from_numpy(history[0])).sample
    ref = np.clip(ref.permute(0, 2, 3, 1).numpy() / 2 + 0.5, 0, 1)  # (steps+1, H, W, 3)

    shown = []
    frames = pipe(**run, output_type="np", return_latent_history=True, history_decoder="taesd",
                  callback_on_step_end=PreviewCallback(lambda step, im: shown.append((step, im)), every=2))
    assert frames.shape == (1, 4, 40, 56, 3)
    assert report("TAESD history frames vs AutoencoderTiny", max_abs_error(frames[0], ref)) < 1e-4
    assert [s for s, _ in shown] == [1] and shown[0][1].size == (56, 40)
    assert max_abs_error(np.asarray(shown[0][1], np.float32) / 255, ref[2]) <= 1 / 255 + 1e-6

    linear = pipe(**run, output_type="np", return_latent_history=True, history_decoder="linear")
    assert max_abs_error(linear[0], latents_to_rgb(history[0], upscale=8)) < 1e-6

    plain = pipe(**run, output_type="np", return_latent_history=True)
    vae = pipe(**run, output_type="np", return_latent_history=True, history_decoder="vae")
    assert np.array_equal(plain, vae)  # the default path, bit for bit
    images = pipe(**run, output_type="np", history_decoder="taesd")  # no history: the final image is the VAE's
    assert np.array_equal(images, plain[:, -1])


def test_every_pipeline_with_history_takes_history_decoder(pipelines, sd1):
    """Image-to-image and interpolation videos decoded by the linear approximation are exactly ``latents_to_rgb``
    of the latent history the same call gives."""
    from mlx_stablefused import ImageToImageDiffusion, LatentWalkDiffusion
    from mlx_stablefused.previews import latents_to_rgb

    i2i = pipelines.pipeline(ImageToImageDiffusion, sd1[1], backend="mlx", scheduler="ddim")
    image = np.random.default_rng(7).uniform(0, 1, (1, 24, 32, 3)).astype(np.float32)
    run = dict(image=image, prompt="x", num_inference_steps=3, strength=0.7, seed=1, return_latent_history=True)
    latents = i2i(**run, output_type="latent")
    assert np.array_equal(i2i(**run, output_type="np", history_decoder="linear")[0],
                          latents_to_rgb(latents[0], upscale=8))
    walk = pipelines.pipeline(LatentWalkDiffusion, sd1[1], backend="mlx", scheduler="ddim")
    run = dict(prompt=["a", "b"], image_height=16, image_width=16, num_inference_steps=2, interpolation_steps=1,
               seed=2, return_latent_history=True)
    latents = walk.interpolate(**run, output_type="latent")
    frames = walk.interpolate(**run, output_type="np", history_decoder="linear")
    assert np.array_equal(frames, np.stack([latents_to_rgb(v, upscale=8) for v in latents]))


def test_refused_before_work_and_clear_errors(pipelines, sd1, taesd, tmp_path, monkeypatch):
    from mlx_stablefused import TextToImageDiffusion
    from mlx_stablefused.errors import ModelSourceError, UnsupportedModelError
    from mlx_stablefused.previews import PreviewCallback

    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], backend="mlx")
    started = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a: started.append(1))
    for kwargs, match in ((dict(history_decoder="taesd"), "load_tiny_autoencoder"),
                          (dict(history_decoder="fast"), "history_decoder='fast'")):
        with pytest.raises(ValueError, match=match):
            pipe("x", num_inference_steps=2, return_latent_history=True, **kwargs)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="PreviewCallback method='taesd' needs"):  # before the first step
        pipe("x", num_inference_steps=2, callback_on_step_end=PreviewCallback(print), image_height=16,
             image_width=16)
    assert started == []
    with pytest.raises(ValueError, match="method="):
        PreviewCallback(print, method="fast")
    with pytest.raises(ValueError, match="every"):
        PreviewCallback(print, every=0)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="could not get the tiny autoencoder 'someone/not-cached-taesd'.*"
                                               "pass its folder"):
        pipe.load_tiny_autoencoder("someone/not-cached-taesd")
    with pytest.raises(ModelSourceError, match="no config.json"):
        pipe.load_tiny_autoencoder(tmp_path)
    wide = tmp_path / "wide"
    from diffusers import AutoencoderTiny

    AutoencoderTiny(**{**TINY_TAESD, "latent_channels": 16}).save_pretrained(str(wide))
    with pytest.raises(UnsupportedModelError, match="16-channel latents"):
        pipe.load_tiny_autoencoder(wide)
    with pytest.raises(UnsupportedModelError, match="AutoencoderTiny"):
        pipe.load_tiny_autoencoder(Path(sd1[1]) / "vae")
    assert "tiny_vae" not in pipe.backend.components


@pytest.mark.slow
def test_full_size_taesd_matches_diffusers(backend_name, tmp_path):
    """TAESD's own architecture (diffusers' AutoencoderTiny defaults, 64 channels) on 64x64 latents (512x512)."""
    from diffusers import AutoencoderTiny

    from mlx_stablefused.model_description import TINY_AUTOENCODER
    from mlx_stablefused.model_loading import load_network

    model = randomize(AutoencoderTiny(), seed=22)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    if backend_name == "mlx":
        from mlx_stablefused.backends.mlx.loading import NETWORKS as networks
    else:
        from mlx_stablefused.backends.torch.loading import TorchNetworks

        networks = TorchNetworks("cpu")
    ours = load_network(tmp_path, "tiny_vae", networks, description=TINY_AUTOENCODER)
    latents = np.random.default_rng(5).standard_normal((1, 4, 64, 64)).astype(np.float32)
    pixels = np.random.default_rng(6).uniform(-1, 1, (1, 512, 512, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latents)).sample.permute(0, 2, 3, 1).numpy()
        ref_latent = model.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latents.numpy()
    if backend_name == "mlx":
        import mlx.core as mx

        decoded = np.asarray(ours.decode(mx.array(latents.transpose(0, 2, 3, 1))))
        encoded = np.asarray(ours.encode(mx.array(pixels))).transpose(0, 3, 1, 2)
    else:
        decoded = ours.decode(torch.from_numpy(latents)).permute(0, 2, 3, 1).numpy()
        encoded = ours.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    assert report(f"full-size TAESD decode vs AutoencoderTiny ({backend_name})", rel_error(decoded, ref)) < 1e-4
    assert report(f"full-size TAESD encode vs AutoencoderTiny ({backend_name})",
                  rel_error(encoded, ref_latent)) < 1e-4
