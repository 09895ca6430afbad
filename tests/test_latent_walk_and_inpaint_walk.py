"""Latent walks (similar images, prompt interpolation) and inpainting walks (pans, zooms)."""

import numpy as np
import pytest
from PIL import Image

from mlx_stablefused import InpaintDiffusion, LatentWalkDiffusion, TextToImageDiffusion, WalkType, lerp, slerp
from mlx_stablefused.pipelines.walk_geometry import pan_frames, shift_and_mask, shrink_and_mask, zoom_out_frames


@pytest.fixture
def pipes(sd1, pipelines):
    """Text-to-image, latent walk and inpainting pipelines on the session's shared SD1 model (DDIM)."""
    t2i = pipelines.pipeline(TextToImageDiffusion, sd1[1], scheduler="ddim")
    return t2i, LatentWalkDiffusion.from_pipeline(t2i), InpaintDiffusion.from_pipeline(t2i)


PROMPTS = ["a photo of the cat", "an astronaut", "the end"]


def test_interpolation_endpoints_equal_text_to_image(pipes):
    t2i, walk, _ = pipes
    latents = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    frames = walk.interpolate(PROMPTS, latent=latents, num_inference_steps=3, interpolation_steps=[2, 3],
                              negative_prompt=["blurry", "", "dark"], output_type="np", batch_size=2)
    assert frames.shape == (2 + 3 + 1, 64, 64, 3)  # no duplicated frames at pair boundaries
    first = t2i(PROMPTS[0], negative_prompt="blurry", latent=latents[:1], num_inference_steps=3, output_type="np")
    second = t2i(PROMPTS[1], latent=latents[1:2], num_inference_steps=3, output_type="np")
    last = t2i(PROMPTS[2], negative_prompt="dark", latent=latents[2:], num_inference_steps=3, output_type="np")
    np.testing.assert_allclose(frames[0], first[0], atol=1e-5)
    np.testing.assert_allclose(frames[2], second[0], atol=1e-5)  # pair 2 starts at prompt 2
    np.testing.assert_allclose(frames[-1], last[0], atol=1e-5)


def test_interpolation_middle_frame_is_the_interpolated_embedding_and_latent(pipes):
    t2i, walk, _ = pipes
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    frames = walk.interpolate(PROMPTS[:2], latent=latents, num_inference_steps=2, interpolation_steps=4,
                              output_type="latent")
    emb = t2i.backend.to_numpy(t2i.prompt_to_embedding(PROMPTS[:2]))
    uncond, cond = emb[:2], emb[2:]
    t = 0.5  # frame 2 of 4 (weights 0, 1/4, 1/2, 3/4)
    mixed = np.concatenate([lerp(uncond[0], uncond[1], t)[None], lerp(cond[0], cond[1], t)[None]])
    x = slerp(latents[0], latents[1], t)[None]
    rng = np.random.default_rng(0)
    expected = t2i.sample_from_noise(t2i.backend.from_numpy(mixed), x, 2, 7.5, 0.0, rng)[-1]
    np.testing.assert_allclose(frames[2], t2i.backend.latent_to_numpy(expected)[0], atol=1e-4)


def test_interpolation_batching_and_duplicates(pipes):
    """Batching and boundary frames are bookkeeping over frames: 32x32 images show it at a quarter the cost."""
    _, walk, _ = pipes
    args = dict(image_height=32, image_width=32, num_inference_steps=2, interpolation_steps=3, seed=4,
                output_type="np")
    one = walk.interpolate(PROMPTS, batch_size=1, **args)
    many = walk.interpolate(PROMPTS, batch_size=5, **args)
    np.testing.assert_allclose(one, many, atol=1e-5)
    dup = walk.interpolate(PROMPTS, duplicate_endpoints=True, **args)
    assert len(one) == 7 and len(dup) == 6  # stablefused: steps * pairs, boundary frames repeated
    np.testing.assert_allclose(dup[2], dup[3], atol=1e-5)
    hist = walk.interpolate(PROMPTS[:2], return_latent_history=True, **args)
    assert hist.shape == (4, 3, 32, 32, 3)


@pytest.mark.parametrize("kw,error,match", [
    (dict(prompt=["only one"]), ValueError, "at least two"),
    (dict(interpolation_steps=[2]), ValueError, "one per consecutive pair"),
    (dict(interpolation_steps=0), ValueError, ">= 1"),
    (dict(embedding_interpolation_type="cubic"), ValueError, "embedding interpolation"),
    (dict(latent_interpolation_type="cubic"), ValueError, "latent interpolation"),
    (dict(latent=np.zeros((2, 4, 8, 8), np.float32)), ValueError, "one per prompt"),
    (dict(negative_prompt=["a", "b"]), ValueError, "negative prompt"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_interpolation_bad_arguments(pipes, kw, error, match):
    _, walk, _ = pipes
    args = dict(prompt=PROMPTS, image_height=64, image_width=64, num_inference_steps=2, interpolation_steps=2)
    with pytest.raises(error, match=match):
        walk.interpolate(**{**args, **kw})


def test_similar_images_around_a_latent(pipes):
    t2i, walk, _ = pipes
    base = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    same = walk("the cat", base, strength=0.0, num_inference_steps=3, noise=noise, output_type="np")
    standardised = (base - base.mean()) / base.std()
    np.testing.assert_allclose(same, t2i("the cat", latent=standardised, num_inference_steps=3, output_type="np"),
                               atol=1e-5)
    moved = walk("the cat", base, strength=0.3, num_inference_steps=3, noise=noise, output_type="latent")
    expected_start = walk.modify_latent(base, 0.3, noise)
    direct = t2i("the cat", latent=expected_start, num_inference_steps=3, output_type="latent")
    np.testing.assert_allclose(moved, direct, atol=1e-5)
    several = walk("the cat", np.repeat(base, 3, axis=0), strength=0.2, num_inference_steps=2, seed=0,
                   output_type="np")
    assert several.shape == (3, 64, 64, 3) and np.abs(several[0] - several[1]).max() > 1e-3
    with pytest.raises(ValueError, match="strength"):
        walk("x", base, strength=1.5)
    with pytest.raises(ValueError, match="2 prompts for 3 latents"):
        walk(["a", "b"], np.repeat(base, 3, axis=0))


# ------------------------------------------------------------------------------------- walk geometry
def gradient(w=64, h=48):
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 4 % 256, y * 5 % 256, (x + y) % 256], -1).astype(np.uint8))


@pytest.mark.parametrize("walk,moved,strip", [
    (WalkType.RIGHT, lambda a, s: (a[:, s:], np.s_[:, :-8]), np.s_[:, -8:]),
    (WalkType.LEFT, lambda a, s: (a[:, :-s], np.s_[:, 8:]), np.s_[:, :8]),
    (WalkType.DOWN, lambda a, s: (a[s:], np.s_[:-8]), np.s_[-8:]),
    (WalkType.UP, lambda a, s: (a[:-s], np.s_[8:]), np.s_[:8]),
])
def test_shift_exposes_a_strip_on_the_side_the_camera_moves_to(walk, moved, strip):
    img = gradient()
    out, mask = shift_and_mask(img, walk, 8)
    a, o, m = np.asarray(img), np.asarray(out), np.asarray(mask)
    content, where = moved(a, 8)
    np.testing.assert_array_equal(o[where], content)
    assert (m[strip] == 255).all() and m.sum() == 255 * m[strip].size
    frames = pan_frames(img, out, walk, 8, 4)
    assert len(frames) == 4 and all(f.size == img.size for f in frames)
    np.testing.assert_array_equal(np.asarray(frames[-1]), o)


def test_zoom_out_shrinks_and_frames_end_on_the_painted_image():
    img = gradient(64, 64)
    out, mask = shrink_and_mask(img, (8, 16))
    m = np.asarray(mask)
    assert (m[16:48, 8:56] == 0).all() and (m[:16] == 255).all() and (m[:, :8] == 255).all()
    frames = zoom_out_frames(img, out, (8, 16), 5)
    assert len(frames) == 5 and np.array_equal(np.asarray(frames[-1]), np.asarray(out))


def test_walk_frame_counts_and_chaining(pipes):
    _, _, inpaint = pipes
    img = gradient(64, 64)
    args = dict(image_height=64, image_width=64, height_translation_per_step=16, width_translation_per_step=8,
                num_inference_steps=2, interpolation_steps=3, seed=0)
    frames = inpaint.walk(["the cat", "a dog"], img, ["right", "up"], num_inpainting_steps=2,
                          negative_prompt=["blurry", None], **args)
    assert len(frames) == 6 and all(f.size == (64, 64) for f in frames)
    again = inpaint.walk(["the cat", "a dog"], img, ["right", "up"], num_inpainting_steps=2,
                         negative_prompt=["blurry", None], **args)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, again))  # seeded
    zoom = inpaint.walk("the cat", img, "backward", num_inpainting_steps=2, **args)
    zoom_in = inpaint.walk("the cat", img, "forward", num_inpainting_steps=2, **args)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(zoom[::-1], zoom_in))
    factor = inpaint.walk("x", img, "left", translation_factor=0.25, num_inpainting_steps=1, **args)
    assert len(factor) == 3


@pytest.mark.parametrize("kw,match", [
    (dict(walk_type="sideways"), "unknown walk type"),
    (dict(walk_type=["forward", "up"]), "cannot be mixed"),
    (dict(walk_type="up", height_translation_per_step=0), "between 1 and"),
    (dict(walk_type="left", width_translation_per_step=64), "between 1 and"),
    (dict(walk_type="backward", width_translation_per_step=32), "zoom-out border"),
    (dict(walk_type=["up", "down", "left"]), "walk_type has 3 entries"),
    (dict(walk_type="up", prompt=["a", "b", "c"]), "prompt has 3 entries"),
    (dict(walk_type="up", translation_factor=1.5), "translation_factor"),
    (dict(walk_type="up", interpolation_steps=0), "interpolation_steps"),
    (dict(walk_type="up", image_height=60), "multiple of 8"),
])
def test_walk_bad_arguments(pipes, kw, match):
    _, _, inpaint = pipes
    args = dict(prompt="x", image=gradient(64, 64), image_height=64, image_width=64, num_inpainting_steps=2,
                interpolation_steps=2, num_inference_steps=2)
    with pytest.raises(ValueError, match=match):
        inpaint.walk(**{**args, **kw})
