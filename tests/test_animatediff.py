"""AnimateDiff on MLX against diffusers: one motion module, the motion UNet, the loader, the pipeline.

Model parity runs with and without a motion mid block on both backends; pipeline behaviour (outputs,
norm switch, context windows) on the mid-block adapter, where every motion module exists.
"""

import numpy as np
import pytest
import torch
from helpers import BACKENDS, max_abs_error, rel_error, report

import mlx.core as mx
from mlx_stablefused import ANIMATEDIFF_DDIM, TextToVideoDiffusion, UnsupportedModelError, WeightLoadError

MID_BLOCK = [True, False]
MID_BLOCK_IDS = ["mid-block", "no-mid-block"]
# Pipeline behaviour does not depend on the adapter's layout: the no-mid-block variants run under -m slow.
MID_BLOCK_THEN_SLOW = [True, pytest.param(False, marks=pytest.mark.slow)]


def video_pipeline(pipelines, sd1, motion_adapters, backend, mid_block=True, scheduler=None):
    """A new TextToVideoDiffusion on the session's cached SD1 + adapter model."""
    return pipelines.pipeline(TextToVideoDiffusion, sd1[1], backend, scheduler=scheduler,
                              motion_adapter=motion_adapters[mid_block][1])


@pytest.fixture(scope="module")
def references():
    """Diffusers outputs, computed once and compared against both backends."""
    return {}


class PerFrameNorm(torch.nn.Module):
    """The original AnimateDiff GroupNorm: statistics per frame, on (B*F, C, H, W)."""

    def __init__(self, norm):
        super().__init__()
        self.inner = norm

    def forward(self, x):  # x: (B, C, F, H, W)
        b, c, f, h, w = x.shape
        y = self.inner(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("per_frame", [False, True], ids=["diffusers-norm", "original-norm"])
def test_one_motion_module(sd1, motion_adapters, pipelines, backend_name, per_frame):
    """The loaded UNet's first motion module against the adapter's (diffusers AnimateDiffTransformer3D)."""
    reference = motion_adapters[True][0].down_blocks[0].motion_modules[0]
    video = video_pipeline(pipelines, sd1, motion_adapters, backend_name)
    ours = video.backend.unet_model.down_blocks[0].motion_modules[0]  # diffusers' module path
    x = np.random.default_rng(0).standard_normal((2 * 6, 16, 5, 7)).astype(np.float32)  # B=2, F=6, odd H, W
    with torch.no_grad():
        if per_frame:
            norm = reference.norm
            reference.norm = PerFrameNorm(norm)
            try:
                expected = reference(torch.from_numpy(x), num_frames=6).numpy()
            finally:
                reference.norm = norm  # the session's adapter
        else:
            expected = reference(torch.from_numpy(x), num_frames=6).numpy()
    video.set_motion_norm(per_frame=per_frame)  # this pipeline's setting, in force during its calls
    with video.backend.using(video.settings):  # (here: around a direct call of the module)
        if backend_name == "mlx":
            got = np.asarray(ours(mx.array(x.transpose(0, 2, 3, 1)), 6)).transpose(0, 3, 1, 2)
        else:
            with torch.no_grad():
                got = ours(torch.from_numpy(x), 6).numpy()
    label = f"motion module (rel){' per-frame norm' if per_frame else ''} [{backend_name}]"
    assert report(label, rel_error(got, expected)) < 1e-4


@pytest.mark.parametrize("frames,size", [(1, (8, 8)), (6, (17, 13)), (16, (8, 8))])
@pytest.mark.parametrize("mid_block", MID_BLOCK, ids=MID_BLOCK_IDS)
def test_motion_unet(sd1, motion_adapters, pipelines, references, backend_name, mid_block, frames, size):
    from diffusers import UNetMotionModel

    rng = np.random.default_rng(frames)
    sample = rng.standard_normal((2, 4, frames, *size)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    key = ("motion unet", mid_block, frames)
    if key not in references:
        ref = UNetMotionModel.from_unet2d(sd1[0].unet, motion_adapters[mid_block][0]).eval()
        with torch.no_grad():
            references[key] = ref(torch.from_numpy(sample), torch.tensor(500.0),
                                  torch.from_numpy(ctx).repeat_interleave(frames, dim=0)).sample.numpy()
    b = video_pipeline(pipelines, sd1, motion_adapters, backend_name, mid_block).backend
    got = b.latent_to_numpy(b.unet(b.latent_from_numpy(sample), 500.0, b.from_numpy(ctx)))
    assert report(f"motion UNet, F in {{1, 6, 16}}, odd sizes (rel) [{b.name}]", rel_error(got, references[key])) < 1e-4


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("mid_block", MID_BLOCK, ids=MID_BLOCK_IDS)
def test_original_checkpoint_equals_diffusers_folder(sd1, motion_adapters, pipelines, backend_name, mid_block,
                                                     tmp_path, suffix):
    """The same weights as an original AnimateDiff file load to the same network: one step shows it."""
    from tiny_models import to_original_format

    ad, _ = motion_adapters[mid_block]
    _, root = sd1
    original = to_original_format(ad.state_dict(), pe_length=24)
    path = tmp_path / f"mm_tiny{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": original, "animatediff_config": {"note": "non-tensor entry"}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    from_folder = video_pipeline(pipelines, sd1, motion_adapters, backend_name, mid_block)
    from_file = TextToVideoDiffusion(root, motion_adapter=path, progress=False, backend=backend_name,
                                     motion_adapter_config={"motion_num_attention_heads": 2})  # not in the file
    assert from_file.max_frames == 24  # taken from the pe buffers
    assert from_file.backend.motion_config.use_mid_block == mid_block
    args = dict(prompt="a cat", video_frames=3, video_height=32, video_width=32, num_inference_steps=1, seed=0,
                output_type="np")
    np.testing.assert_array_equal(from_file(**args), from_folder(**args))


@pytest.mark.parametrize("mid_block,scheduler", [
    pytest.param(True, "ddim", id="mid-block-ddim"), pytest.param(True, "euler", id="mid-block-euler"),
    pytest.param(False, "ddim", id="no-mid-block-ddim"),
    pytest.param(False, "euler", id="no-mid-block-euler", marks=pytest.mark.slow)])
def test_pipeline_matches_animatediff_pipeline(sd1, motion_adapters, pipelines, references, backend_name, mid_block,
                                               scheduler):
    import diffusers

    pipe, root = sd1
    latents = np.random.default_rng(9).standard_normal((1, 4, 6, 8, 8)).astype(np.float32)
    key = ("AnimateDiffPipeline", mid_block, scheduler)
    if key not in references:
        config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
        cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[scheduler]
        scheduler_options = {k: v for k, v in ANIMATEDIFF_DDIM.items() if k in cls._get_init_keys(cls)}
        ref = diffusers.AnimateDiffPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                            unet=pipe.unet, motion_adapter=motion_adapters[mid_block][0],
                                            scheduler=cls.from_config(config, **scheduler_options))
        ref.set_progress_bar_config(disable=True)
        with torch.no_grad():
            references[key] = ref(prompt="a cat walking", negative_prompt="blurry", num_frames=6, height=64, width=64,
                                  num_inference_steps=3, guidance_scale=7.5, latents=torch.from_numpy(latents),
                                  output_type="np").frames
    ours = video_pipeline(pipelines, sd1, motion_adapters, backend_name, mid_block)
    if scheduler == "ddim":
        ours.set_scheduler(scheduler, **ANIMATEDIFF_DDIM)
    else:
        ours.set_scheduler(scheduler, beta_schedule="linear", timestep_spacing="linspace", steps_offset=1)
    got = ours("a cat walking", negative_prompt="blurry", latent=latents, num_inference_steps=3, guidance_scale=7.5,
               output_type="np")
    expected = np.asarray(references[key])
    assert got.shape == expected.shape == (1, 6, 64, 64, 3)
    assert report(f"AnimateDiff pipeline vs AnimateDiffPipeline (max abs) [{backend_name}]",
                  max_abs_error(got, expected)) < 5e-3


@pytest.mark.parametrize("mid_block", MID_BLOCK_THEN_SLOW, ids=MID_BLOCK_IDS)
def test_outputs_and_decode_batches(sd1, motion_adapters, pipelines, backend_name, mid_block):
    video = video_pipeline(pipelines, sd1, motion_adapters, backend_name, mid_block)
    args = dict(prompt=["a", "b"], video_frames=3, video_height=64, video_width=48, num_inference_steps=2, seed=1)
    frames = video(output_type="pil", **args)
    assert len(frames) == 2 and len(frames[0]) == 3 and frames[0][0].size == (48, 64)
    a = video(output_type="np", decode_batch_size=1, **args)
    b = video(output_type="np", decode_batch_size=5, **args)
    np.testing.assert_allclose(a, b, atol=1e-5)  # batch size changes kernel choice, not results
    assert video(output_type="latent", **args).shape == (2, 4, 3, 8, 6)
    decoded = []  # enable_slicing() (the low-memory preset's VAE setting) caps the call's decode_batch_size
    vae_decode = video.backend.vae_decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(video.backend, "vae_decode", lambda z: (decoded.append(video.backend.latent_shape(z)[0]),
                                                              vae_decode(z))[1])
        video.enable_slicing()
        try:
            sliced = video(output_type="np", **args)  # decode_batch_size's default, 4
        finally:
            video.disable_slicing()
    assert decoded == [1] * 6
    np.testing.assert_allclose(sliced, a, atol=1e-5)
    native = video(output_type=video.backend.native_output_type, **args)
    expected_shape = (2, 3, 64, 48, 3) if video.backend.name == "mlx" else (2, 3, 3, 64, 48)
    assert tuple(native.shape) == expected_shape


@pytest.mark.parametrize("mid_block", MID_BLOCK_THEN_SLOW, ids=MID_BLOCK_IDS)
def test_per_frame_norm_switch_changes_the_video(sd1, motion_adapters, pipelines, backend_name, mid_block):
    video = video_pipeline(pipelines, sd1, motion_adapters, backend_name, mid_block)
    args = dict(prompt="a", video_frames=4, video_height=64, video_width=64, num_inference_steps=2, seed=0,
                output_type="np")
    default = video(**args)
    video.set_motion_norm(per_frame=True)  # this pipeline's setting (others sharing the model keep theirs)
    try:
        original = video(**args)
    finally:
        video.set_motion_norm(per_frame=False)
    assert np.abs(original - default).max() > 1e-4
    np.testing.assert_array_equal(video(**args), default)


@pytest.mark.parametrize("mid_block", MID_BLOCK_THEN_SLOW, ids=MID_BLOCK_IDS)
def test_context_windows_for_long_videos(sd1, motion_adapters, pipelines, backend_name, mid_block):
    """Beyond the motion module's 32 frames only with windows; one window changes nothing. 32x32 frames:
    the windowing is over frames, and small frames keep 40 of them cheap."""
    video = video_pipeline(pipelines, sd1, motion_adapters, backend_name, mid_block)
    args = dict(prompt="a", video_height=32, video_width=32, num_inference_steps=2, seed=2, output_type="np")
    with pytest.raises(ValueError, match="maximum of 32"):
        video(video_frames=40, **args)
    short = video(video_frames=8, **args)
    video.enable_context_windows(length=16, stride=4)
    try:
        np.testing.assert_allclose(video(video_frames=8, **args), short, atol=1e-5)  # one window: unchanged
        long = video(video_frames=40, **args)
        assert long.shape == (1, 40, 32, 32, 3) and np.isfinite(long).all()
    finally:
        video.disable_context_windows()
    with pytest.raises(ValueError, match="exceeds the motion module's maximum"):
        video.enable_context_windows(length=33)


def test_bad_adapters(sd1, tmp_path):
    from diffusers import MotionAdapter
    from safetensors.torch import save_file
    from tiny_models import SD1, build_motion_adapter, randomize

    _, root = sd1
    with pytest.raises(ValueError, match="pass motion_adapter="):
        TextToVideoDiffusion(root)
    wrong = randomize(MotionAdapter(block_out_channels=(16, 32, 48), motion_layers_per_block=2,
                                    motion_num_attention_heads=2, motion_norm_num_groups=4), 1)
    wrong.save_pretrained(str(tmp_path / "wrong"))
    with pytest.raises(UnsupportedModelError, match=r"channels \[16, 32, 48\] do not match"):
        TextToVideoDiffusion(root, motion_adapter=tmp_path / "wrong")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightLoadError, match="corrupt"):
        TextToVideoDiffusion(root, motion_adapter=bad)
    state = build_motion_adapter(False).state_dict()
    state.pop("down_blocks.0.motion_modules.0.proj_out.weight")
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightLoadError, match=r"missing: 'down_blocks\.0\.motion_modules\.0\.proj_out\.weight'"):
        TextToVideoDiffusion(root, motion_adapter=tmp_path / "missing.safetensors")
    assert SD1.unet["layers_per_block"] == 2


@pytest.mark.parametrize("mid_block", MID_BLOCK_THEN_SLOW, ids=MID_BLOCK_IDS)
def test_same_video_on_mlx_and_torch(sd1, motion_adapters, pipelines, mid_block):
    args = dict(prompt=["a cat", "a dog"], video_frames=5, video_height=64, video_width=48, num_inference_steps=3,
                seed=11, output_type="np")
    a, b = (video_pipeline(pipelines, sd1, motion_adapters, backend, mid_block, "euler_ancestral")(**args)
            for backend in BACKENDS)
    assert report("MLX vs torch, AnimateDiff video, same seed (max abs)", max_abs_error(a, b)) < 5e-3
