"""The sampling core and what is built on it: step callbacks and interrupts (vs diffusers' own),
latent history, per-pipeline run settings, the Conditioning object, backend shape helpers."""

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, max_abs_error, rel_error, report

from mlx_stablefused import InpaintDiffusion, TextToImageDiffusion, TextToVideoDiffusion
from mlx_stablefused.conditioning import Conditioning

ARGS = dict(prompt=["a photo of the cat", "an astronaut"], negative_prompt=["blurry", ""], num_inference_steps=4,
            guidance_scale=7.5)


def ours(root, pipelines, backend="mlx"):
    """A DDIM text-to-image pipeline of its own on the session's cached model."""
    return pipelines.pipeline(TextToImageDiffusion, root, backend, scheduler="ddim")


def diffusers_images(pipe, root, latents, **kwargs):
    import diffusers

    pipe = diffusers_pipeline(pipe, scheduler=diffusers.DDIMScheduler.from_pretrained(str(root), subfolder="scheduler"))
    with torch.no_grad():  # a pipeline of its own: the session's diffusers pipeline keeps its scheduler
        return pipe(latents=torch.from_numpy(latents), output_type="np", height=64, width=64, **ARGS,
                    **kwargs).images


def test_callback_that_edits_latents_matches_diffusers(sd1, pipelines, backend_name):
    """A callback halving the latents after step 1 changes the image exactly as in diffusers."""
    pipe, root = sd1
    p = ours(root, pipelines, backend_name)
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    seen = []

    def ours_cb(pipeline, step, timestep, tensors):
        assert pipeline is p and set(tensors) == {"latents", "noise_pred"}
        seen.append((step, timestep))
        return {"latents": tensors["latents"] * 0.5} if step == 1 else None

    def ref_cb(pipeline, step, timestep, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if step == 1 else kwargs

    ref = diffusers_images(pipe, root, latents, callback_on_step_end=ref_cb)
    plain = p(latent=latents, output_type="np", **ARGS)
    got = p(latent=latents, output_type="np", callback_on_step_end=[ours_cb], **ARGS)
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t in seen] == [float(t) for t in p.scheduler.timesteps]
    assert report(f"callback editing latents vs diffusers (max abs) [{backend_name}]", max_abs_error(got, ref)) < 5e-3
    assert max_abs_error(got, plain) > 5e-2  # the edit really changed the result


def test_interrupt_matches_diffusers(sd1, pipelines, backend_name):
    """``pipe.interrupt()`` after step 1 returns the partly denoised image, as diffusers' ``_interrupt``."""
    pipe, root = sd1
    p = ours(root, pipelines, backend_name)
    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)

    def ref_cb(pipeline, step, timestep, kwargs):
        if step == 1:
            pipeline._interrupt = True
        return kwargs

    calls = []

    def ours_cb(pipeline, step, timestep, tensors):
        calls.append(step)
        if step == 1:
            pipeline.interrupt()

    ref = diffusers_images(pipe, root, latents, callback_on_step_end=ref_cb)
    got = p(latent=latents, output_type="np", callback_on_step_end=ours_cb, **ARGS)
    assert calls == [0, 1] and p.interrupted
    assert report(f"interrupt after step 1 vs diffusers' _interrupt (max abs) [{backend_name}]",
                  max_abs_error(got, ref)) < 5e-3
    p(latent=latents, output_type="latent", **ARGS)
    assert not p.interrupted  # cleared by the next call


def test_latent_history_equals_what_a_callback_sees(sd1, pipelines):
    _, root = sd1
    p = ours(root, pipelines)
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    collected = []
    history = p(latent=latents, output_type="latent", return_latent_history=True,
                callback_on_step_end=lambda pipe, i, t, d: collected.append(np.asarray(d["latents"])),
                **ARGS)
    assert history.shape == (2, 5, 4, 8, 8)
    np.testing.assert_array_equal(history[:, 1:], np.stack(collected, axis=1))


def test_bad_callbacks_are_refused(sd1, pipelines):
    _, root = sd1
    p = ours(root, pipelines)
    with pytest.raises(TypeError, match="callable"):
        p(output_type="latent", image_height=64, image_width=64, callback_on_step_end=[1], **ARGS)
    with pytest.raises(TypeError, match="dict or None"):
        p(output_type="latent", image_height=64, image_width=64, callback_on_step_end=lambda *a: 3, **ARGS)
    with pytest.raises(ValueError, match="diffusers' layout, as the callback got them"):
        p(output_type="latent", image_height=64, image_width=64,
          callback_on_step_end=lambda pipe, i, t, d: {"latents": d["latents"][:1]}, **ARGS)


@pytest.mark.parametrize("name,value", [("guidance_scale", float("nan")), ("guidance_rescale", float("inf")),
                                        ("guidance_scale", "7")])
def test_non_finite_guidance_is_refused_before_any_work(sd1, pipelines, monkeypatch, name, value):
    _, root = sd1
    p = ours(root, pipelines)
    calls = []
    monkeypatch.setattr(p.backend, "encode_text", lambda ids: calls.append(ids))
    with pytest.raises(ValueError, match=name):
        p(output_type="latent", image_height=64, image_width=64, **{**ARGS, name: value})
    assert calls == []


def test_non_finite_latents_are_refused(sd1, pipelines):
    _, root = sd1
    p = ours(root, pipelines)
    bad = np.full((2, 4, 8, 8), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        p(latent=bad, output_type="latent", **ARGS)


def test_settings_belong_to_one_pipeline(sd1, pipelines):
    """A video pipeline on shared components slices attention for itself only; the image pipeline's
    modules run unchunked again after the video call, and its images do not change."""
    _, root = sd1
    image = TextToImageDiffusion(model_id=root, progress=False, scheduler="ddim")
    args = dict(ARGS, image_height=64, image_width=64, output_type="np", seed=0)
    before = image(**args)
    image.enable_attention_slicing(3)
    shared = TextToImageDiffusion.from_pipeline(image)
    assert shared.settings.attention_chunk == 3
    shared.disable_attention_slicing()
    assert image.settings.attention_chunk == 3 and shared.settings.attention_chunk is None

    chunks = []

    def record(pipe, step, t, tensors):
        chunks.append(attention_chunks(pipe.backend))

    chunked = image(callback_on_step_end=record, **args)
    plain = shared(callback_on_step_end=record, **args)
    assert chunks[0] == {3} and chunks[-1] == {None}
    assert attention_chunks(image.backend) == {None}  # restored after the call
    np.testing.assert_array_equal(plain, before)
    assert np.abs(chunked - before).max() < 1e-5


def test_video_pipeline_does_not_change_a_sharing_image_pipeline(sd1, motion_adapters):
    _, root = sd1
    video = TextToVideoDiffusion(root, motion_adapter=motion_adapters[False][1], progress=False)
    assert video.settings.attention_chunk is not None
    image = TextToImageDiffusion.from_pipeline(video)
    image.disable_attention_slicing()
    seen = []
    video(prompt="x", video_frames=2, video_height=64, video_width=64, num_inference_steps=1, output_type="latent",
          callback_on_step_end=lambda pipe, i, t, d: seen.append(attention_chunks(pipe.backend)))
    assert seen == [{video.settings.attention_chunk}]
    assert attention_chunks(video.backend) == {None}
    video.set_motion_norm(per_frame=True)
    assert image.settings.motion_norm_per_frame is False
    again = TextToVideoDiffusion.from_pipeline(image)  # image kept the default: the video default stays
    assert again.settings.attention_chunk == video.settings.attention_chunk


def attention_chunks(backend):
    """The query chunk every attention module of the UNet and VAE holds now."""
    modules = [m for model in (backend.unet_model, backend.vae) for _, m in model.named_modules()]
    return {getattr(m, "_query_chunk", getattr(m, "query_chunk", "unset")) for m in modules
            if hasattr(m, "set_query_chunk")}


def test_conditioning_joins_splits_and_maps():
    a = Conditioning(text=np.ones((2, 3, 4)), image_channels=np.zeros((2, 5)),
                     down_block_residuals=(np.ones((2, 1)), np.ones((2, 2))))
    b = a.map(lambda x: x * 2)
    both = Conditioning.concat([a, b], lambda xs: np.concatenate(xs, axis=0))
    assert both.batch_size == 4 and both.pooled_text is None
    np.testing.assert_array_equal(both.down_block_residuals[1][2:], 2 * np.ones((2, 2)))
    first, second = both.split([1, 3])
    assert first.batch_size == 1 and second.image_channels.shape == (3, 5)
    with pytest.raises(ValueError, match="only some"):
        Conditioning.concat([a, Conditioning(text=np.ones((2, 3, 4)))], lambda xs: np.concatenate(xs))
    with pytest.raises(ValueError, match="cannot split"):
        both.split([2, 3])


def test_backend_unet_takes_conditioning_or_a_bare_embedding(sd1, pipelines, backend_name):
    """Inpainting's extra channels through Conditioning equal concatenating them by hand."""
    _, root = sd1
    backend = ours(root, pipelines, backend_name).backend
    rng = np.random.default_rng(6)
    x = backend.latent_from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    text = backend.from_numpy(rng.standard_normal((2, 77, 32)).astype(np.float32))
    bare = backend.to_numpy(backend.unet(x, 500.0, text))
    wrapped = backend.to_numpy(backend.unet(x, 500.0, Conditioning(text=text)))
    np.testing.assert_array_equal(bare, wrapped)
    assert backend.latent_shape(x) == (2, 4, 8, 8)


def test_latent_shape_and_frame_helpers(sd1, pipelines, backend_name):
    _, root = sd1
    backend = ours(root, pipelines, backend_name).backend
    video = np.random.default_rng(7).standard_normal((1, 4, 5, 3, 2)).astype(np.float32)
    native = backend.latent_from_numpy(video)
    assert backend.latent_shape(native) == video.shape
    part = backend.take_frames(native, 1, 3)
    np.testing.assert_array_equal(backend.latent_to_numpy(part), video[:, :, 1:3])
    padded = backend.latent_to_numpy(backend.pad_frames(part, 1, 2))
    expected = np.zeros_like(video)
    expected[:, :, 1:3] = video[:, :, 1:3]
    np.testing.assert_array_equal(padded, expected)


def test_inpainting_pipeline_shares_no_class_with_image_to_image():
    from mlx_stablefused import ImageToImageDiffusion

    assert not issubclass(InpaintDiffusion, ImageToImageDiffusion)


def test_backend_unet_passes_controlnet_residuals_as_diffusers(sd1, pipelines, backend_name):
    """Residuals in a Conditioning reach the UNet as diffusers' down/mid additional residuals (the MLX CPU
    path also splits them with the batch across streams)."""
    pipe, root = sd1
    backend = ours(root, pipelines, backend_name).backend
    plan = backend.unet_model.plan
    rng = np.random.default_rng(8)
    h, w = 9, 7
    shapes = [(2, plan.base_channels, h, w)]
    for block in plan.down_blocks:
        shapes += [(2, block.out_channels, h, w)] * len(block.resnets)
        if block.downsample:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((2, block.out_channels, h, w))
    down = [0.5 * rng.standard_normal(s).astype(np.float32) for s in shapes]
    mid = 0.5 * rng.standard_normal((2, plan.mid_block.channels, h, w)).astype(np.float32)
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(x), torch.tensor(321.0), torch.from_numpy(ctx),
                             down_block_additional_residuals=tuple(torch.from_numpy(r) for r in down),
                             mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy()
    cond = Conditioning(text=backend.from_numpy(ctx),
                        down_block_residuals=tuple(backend.latent_from_numpy(r) for r in down),
                        mid_block_residual=backend.latent_from_numpy(mid))
    got = backend.latent_to_numpy(backend.unet(backend.latent_from_numpy(x), 321.0, cond))
    plain = backend.latent_to_numpy(backend.unet(backend.latent_from_numpy(x), 321.0, backend.from_numpy(ctx)))
    assert report(f"Backend.unet + Conditioning residuals vs diffusers (rel) [{backend_name}]",
                  rel_error(got, expected)) < 1e-5
    assert rel_error(plain, expected) > 1e-2  # the residuals matter
