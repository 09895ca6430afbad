"""AnimateDiff on MLX against diffusers: one motion module, the motion UNet, the loader, the pipeline."""

import numpy as np
import pytest
import torch
from conftest import rel_error, report

import mlx.core as mx
from mlx_stablefused import ANIMATEDIFF_DDIM, TextToVideoDiffusion, UnsupportedModelError, WeightLoadError
from mlx_stablefused.backends.mlx.motion import AnimateDiffTransformer3D
from mlx_stablefused.motion_adapters import MOTION_RULES
from mlx_stablefused.backends.mlx.weights import apply_weights, convert_state


@pytest.fixture(scope="module", params=[True, False], ids=["mid-block", "no-mid-block"])
def adapter(request, tmp_path_factory):
    from tiny_models import build_motion_adapter

    ad = build_motion_adapter(request.param)
    folder = tmp_path_factory.mktemp("adapter")
    ad.save_pretrained(str(folder), safe_serialization=True)
    return ad, folder


@pytest.fixture(scope="module", params=["mlx", "torch"])
def video_pipes(request, sd1, adapter):
    _, root = sd1
    _, folder = adapter
    return TextToVideoDiffusion(root, motion_adapter=folder, progress=False, backend=request.param)


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
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_one_motion_module(per_frame, backend):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D as Reference
    from tiny_models import randomize

    ref = randomize(Reference(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
                              norm_num_groups=4, cross_attention_dim=None, attention_bias=False, activation_fn="geglu",
                              positional_embeddings="sinusoidal", num_positional_embeddings=32,
                              double_self_attention=True), seed=3)
    x = np.random.default_rng(0).standard_normal((2 * 6, 16, 5, 7)).astype(np.float32)  # B=2, F=6, odd H, W
    if backend == "mlx":
        ours = AnimateDiffTransformer3D(16, 2, 1, 4, 32)
        apply_weights(ours, convert_state(ours, {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()},
                                          MOTION_RULES), "motion module")
        ours.per_frame_norm = per_frame
        run = lambda: np.asarray(ours(mx.array(x.transpose(0, 2, 3, 1)), 6)).transpose(0, 3, 1, 2)  # noqa: E731
    else:
        from mlx_stablefused.backends.torch.motion import AnimateDiffTransformer3D as TorchModule
        from mlx_stablefused.weights import map_keys

        ours = TorchModule(16, 2, 1, 4, 32).eval()
        ours.load_state_dict(map_keys(ref.state_dict(), MOTION_RULES))
        ours.per_frame_norm = per_frame
        run = lambda: ours(torch.from_numpy(x), 6).detach().numpy()  # noqa: E731
    if per_frame:
        ref.norm = PerFrameNorm(ref.norm)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), num_frames=6).numpy()
        got = run()
    label = f"motion module (rel){' per-frame norm' if per_frame else ''} [{backend}]"
    assert report(label, rel_error(got, expected)) < 1e-4


def motion_unet_reference(sd1, adapter):
    from diffusers import UNetMotionModel

    pipe, _ = sd1
    ad, _ = adapter
    return UNetMotionModel.from_unet2d(pipe.unet, ad).eval()


@pytest.mark.parametrize("frames,size", [(1, (8, 8)), (6, (17, 13)), (16, (8, 8))])
def test_motion_unet(sd1, adapter, video_pipes, frames, size):
    ref = motion_unet_reference(sd1, adapter)
    rng = np.random.default_rng(frames)
    sample = rng.standard_normal((2, 4, frames, *size)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(sample), torch.tensor(500.0),
                       torch.from_numpy(ctx).repeat_interleave(frames, dim=0)).sample.numpy()
    b = video_pipes.backend
    got = b.latent_to_numpy(b.unet(b.latent_from_numpy(sample), 500.0, b.from_numpy(ctx)))
    assert report(f"motion UNet, F in {{1, 6, 16}}, odd sizes (rel) [{b.name}]", rel_error(got, expected)) < 1e-4


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_original_checkpoint_equals_diffusers_folder(sd1, adapter, video_pipes, tmp_path, suffix):
    from tiny_models import to_original_format

    ad, _ = adapter
    _, root = sd1
    original = to_original_format(ad.state_dict(), pe_length=24)
    path = tmp_path / f"mm_tiny{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": original, "animatediff_config": {"note": "non-tensor entry"}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    from_file = TextToVideoDiffusion(root, motion_adapter=path, progress=False, backend=video_pipes.backend.name,
                                     motion_adapter_config={"motion_num_attention_heads": 2})  # not in the file
    assert from_file.max_frames == 24  # taken from the pe buffers
    assert from_file.backend.motion_config.use_mid_block == video_pipes.backend.motion_config.use_mid_block
    args = dict(prompt="a cat", video_frames=4, video_height=64, video_width=64, num_inference_steps=2, seed=0,
                output_type="np")
    np.testing.assert_array_equal(from_file(**args), video_pipes(**args))


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_pipeline_matches_animatediff_pipeline(sd1, adapter, video_pipes, scheduler):
    import diffusers
    from diffusers import AnimateDiffPipeline

    pipe, root = sd1
    ad, _ = adapter
    config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
    cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[scheduler]
    ref = AnimateDiffPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                              unet=pipe.unet, motion_adapter=ad,
                              scheduler=cls.from_config(config, **{k: v for k, v in ANIMATEDIFF_DDIM.items()
                                                                   if k in cls._get_init_keys(cls)}))
    ref.set_progress_bar_config(disable=True)
    video_pipes.set_scheduler(scheduler, **ANIMATEDIFF_DDIM) if scheduler == "ddim" else \
        video_pipes.set_scheduler(scheduler, beta_schedule="linear", timestep_spacing="linspace", steps_offset=1)
    latents = np.random.default_rng(9).standard_normal((1, 4, 6, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref(prompt="a cat walking", negative_prompt="blurry", num_frames=6, height=64, width=64,
                       num_inference_steps=3, guidance_scale=7.5, latents=torch.from_numpy(latents),
                       output_type="np").frames
    got = video_pipes("a cat walking", negative_prompt="blurry", latent=latents, num_inference_steps=3,
                      guidance_scale=7.5, output_type="np")
    assert got.shape == np.asarray(expected).shape == (1, 6, 64, 64, 3)
    assert report(f"AnimateDiff pipeline vs AnimateDiffPipeline (max abs) [{video_pipes.backend.name}]",
                  np.abs(got - expected).max()) < 5e-3


def test_outputs_and_decode_batches(video_pipes):
    args = dict(prompt=["a", "b"], video_frames=3, video_height=64, video_width=48, num_inference_steps=2, seed=1)
    frames = video_pipes(output_type="pil", **args)
    assert len(frames) == 2 and len(frames[0]) == 3 and frames[0][0].size == (48, 64)
    a = video_pipes(output_type="np", decode_batch_size=1, **args)
    b = video_pipes(output_type="np", decode_batch_size=5, **args)
    np.testing.assert_allclose(a, b, atol=1e-5)  # batch size changes kernel choice, not results
    assert video_pipes(output_type="latent", **args).shape == (2, 4, 3, 8, 6)
    native = video_pipes(output_type=video_pipes.backend.native_output_type, **args)
    expected_shape = (2, 3, 64, 48, 3) if video_pipes.backend.name == "mlx" else (2, 3, 3, 64, 48)
    assert tuple(native.shape) == expected_shape


def test_per_frame_norm_switch_changes_the_video(video_pipes):
    args = dict(prompt="a", video_frames=4, video_height=64, video_width=64, num_inference_steps=2, seed=0,
                output_type="np")
    default = video_pipes(**args)
    video_pipes.set_motion_norm(per_frame=True)
    try:
        original = video_pipes(**args)
    finally:
        video_pipes.set_motion_norm(per_frame=False)
    assert np.abs(original - default).max() > 1e-4
    np.testing.assert_array_equal(video_pipes(**args), default)


def test_context_windows_for_long_videos(video_pipes):
    args = dict(prompt="a", video_height=64, video_width=64, num_inference_steps=2, seed=2, output_type="np")
    with pytest.raises(ValueError, match="maximum of 32"):
        video_pipes(video_frames=40, **args)
    short = video_pipes(video_frames=8, **args)
    video_pipes.enable_context_windows(length=16, stride=4)
    try:
        np.testing.assert_allclose(video_pipes(video_frames=8, **args), short, atol=1e-5)  # one window: unchanged
        long = video_pipes(video_frames=40, **args)
        assert long.shape == (1, 40, 64, 64, 3) and np.isfinite(long).all()
    finally:
        video_pipes.disable_context_windows()
    with pytest.raises(ValueError, match="exceeds the motion module's maximum"):
        video_pipes.enable_context_windows(length=33)


def test_bad_adapters(sd1, tmp_path):
    from tiny_models import SD1, build_motion_adapter, randomize

    _, root = sd1
    with pytest.raises(ValueError, match="pass motion_adapter="):
        TextToVideoDiffusion(root)
    from diffusers import MotionAdapter

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
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightLoadError, match=r"missing: 'down_blocks\.0\.motion_modules\.0\.proj_out\.weight'"):
        TextToVideoDiffusion(root, motion_adapter=tmp_path / "missing.safetensors")
    assert SD1.unet["layers_per_block"] == 2


def test_same_video_on_mlx_and_torch(sd1, adapter):
    _, root = sd1
    _, folder = adapter
    args = dict(prompt=["a cat", "a dog"], video_frames=5, video_height=64, video_width=48, num_inference_steps=3,
                seed=11, output_type="np")
    pipes = [TextToVideoDiffusion(root, motion_adapter=folder, progress=False, backend=b,
                                  scheduler="euler_ancestral") for b in ("mlx", "torch")]
    a, b = (p(**args) for p in pipes)
    assert report("MLX vs torch, AnimateDiff video, same seed (max abs)", np.abs(a - b).max()) < 5e-3
