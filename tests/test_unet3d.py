"""ModelScope / Zeroscope UNet3D text-to-video against diffusers (module and pipeline), MLX and torch."""

import numpy as np
import pytest
import torch
from helpers import BACKENDS, convert_with_cli, diffusers_pipeline, max_abs_error, rel_error, report

from mlx_stablefused import TextToImageDiffusion, TextToVideoDiffusion, UnsupportedModelError


@pytest.fixture(scope="module")
def references():
    """Diffusers outputs, computed once and compared against both backends."""
    return {}


@pytest.mark.parametrize("frames,size", [(5, (9, 7)), (1, (8, 8)), (8, (8, 8))])
def test_unet3d_module(unet3d_model, pipelines, references, backend_name, frames, size):
    pipe, root = unet3d_model
    rng = np.random.default_rng(frames)
    sample = rng.standard_normal((2, 4, frames, *size)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    if frames not in references:
        with torch.no_grad():
            references[frames] = pipe.unet(torch.from_numpy(sample), torch.tensor(321.0),
                                           torch.from_numpy(ctx)).sample.numpy()
    b = pipelines.pipeline(TextToVideoDiffusion, root, backend_name).backend
    got = b.latent_to_numpy(b.unet(b.latent_from_numpy(sample), 321.0, b.from_numpy(ctx)))
    assert report(f"UNet3D, odd frame count and size (rel) [{b.name}]", rel_error(got, references[frames])) < 1e-4


@pytest.mark.parametrize("scheduler", ["dpm_multistep", "ddim"])
def test_pipeline_matches_text_to_video_sd_pipeline(unet3d_model, pipelines, references, backend_name, scheduler):
    import diffusers

    pipe, root = unet3d_model
    latents = np.random.default_rng(4).standard_normal((1, 4, 5, 8, 8)).astype(np.float32)
    if scheduler not in references:
        cls = {"dpm_multistep": diffusers.DPMSolverMultistepScheduler, "ddim": diffusers.DDIMScheduler}[scheduler]
        ref = diffusers_pipeline(pipe, scheduler=cls.from_pretrained(str(root), subfolder="scheduler"))
        with torch.no_grad():
            references[scheduler] = np.asarray(ref(prompt="fireworks", negative_prompt="blurry", num_frames=5,
                                                   height=64, width=64, num_inference_steps=4, guidance_scale=9.0,
                                                   latents=torch.from_numpy(latents), output_type="np").frames)
    video = pipelines.pipeline(TextToVideoDiffusion, root, backend_name, scheduler=scheduler)
    got = video("fireworks", negative_prompt="blurry", latent=latents, num_inference_steps=4, guidance_scale=9.0,
                output_type="np")
    assert got.shape == references[scheduler].shape == (1, 5, 64, 64, 3)
    assert report(f"UNet3D pipeline vs TextToVideoSDPipeline (max abs) [{backend_name}]",
                  max_abs_error(got, references[scheduler])) < 5e-3


def test_native_outputs_and_no_frame_limit(unet3d_model, pipelines, backend_name):
    video = pipelines.pipeline(TextToVideoDiffusion, unet3d_model[1], backend_name)
    args = dict(prompt="x", video_frames=3, video_height=64, video_width=48, num_inference_steps=2, seed=0)
    out = video(output_type=video.backend.native_output_type, **args)
    assert tuple(out.shape) in ((1, 3, 64, 48, 3), (1, 3, 3, 64, 48))
    assert video.max_frames is None
    assert video(**{**args, "video_frames": 40, "video_width": 32, "video_height": 32}, output_type="latent").shape \
        == (1, 4, 40, 4, 4)


def test_unet3d_refused_where_it_does_not_fit(unet3d_model, motion_adapters):
    _, root = unet3d_model
    with pytest.raises(UnsupportedModelError, match="TextToVideoDiffusion"):
        TextToImageDiffusion(root, progress=False)("x", num_inference_steps=1, image_height=64, image_width=64)
    with pytest.raises(Exception, match="takes no motion adapter"):
        TextToVideoDiffusion(root, motion_adapter=motion_adapters[False][1], progress=False)


def test_same_video_on_both_backends(unet3d_model, pipelines):
    args = dict(prompt="waves", video_frames=4, video_height=64, video_width=64, num_inference_steps=3, seed=3,
                output_type="np")
    a, b = (pipelines.pipeline(TextToVideoDiffusion, unet3d_model[1], backend)(**args) for backend in BACKENDS)
    assert report("MLX vs torch, UNet3D video, same seed (max abs)", max_abs_error(a, b)) < 5e-3


def test_converted_folder_and_cli(unet3d_model, pipelines, tmp_path):
    from mlx_stablefused.cli import main

    _, root = unet3d_model
    out = convert_with_cli(root, tmp_path / "mlx")
    args = dict(prompt="waves", video_frames=3, video_height=64, video_width=64, num_inference_steps=2, seed=1,
                output_type="np")
    direct = pipelines.pipeline(TextToVideoDiffusion, root)(**args)
    np.testing.assert_array_equal(TextToVideoDiffusion(out, progress=False)(**args), direct)
    np.testing.assert_allclose(TextToVideoDiffusion(out, progress=False, backend="torch")(**args), direct, atol=1e-5)
    gif = tmp_path / "v.gif"
    assert main(["video", "--model", str(root), "--prompt", "waves", "--frames", "3", "--steps", "2", "--height",
                 "64", "--width", "64", "--output", str(gif), "--no-progress"]) == 0
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 3
