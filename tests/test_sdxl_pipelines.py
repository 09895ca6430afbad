"""SDXL pipelines vs diffusers' StableDiffusionXL pipelines on the tiny SDXL models, both backends:
two-encoder prompts (prompt_2, negative_prompt_2, force_zeros_for_empty_prompt), non-default
micro-conditioning, the refiner's aesthetic score, the base-to-refiner ensemble of experts, Turbo."""

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, diffusers_scheduler_for, max_abs_error, rel_error, report
from test_parity_image_pipelines import make_image, make_mask, run_diffusers

from mlx_stablefused import ImageToImageDiffusion, InpaintDiffusion, LatentWalkDiffusion, TextToImageDiffusion
from mlx_stablefused.errors import UnsupportedModelError

IMAGE_TOL = 5e-3
MICRO = dict(original_size=(96, 80), crops_coords_top_left=(8, 16), target_size=(72, 48))


def _noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def references():
    """diffusers' outputs by case, computed once for both backends."""
    cache = {}

    def get(key, compute):
        if key not in cache:
            with torch.no_grad():
                cache[key] = compute()
        return cache[key]

    return get


def test_sdxl_text_to_image_matches_diffusers(sdxl, pipelines, backend_name, references):
    ref, root = sdxl
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    # prompt_to_embedding vs encode_prompt: [uncond; cond] states (2B, 77, 32 + 48) and pooled (2B, 40)
    prompts, prompts_2 = ["a red lighthouse", "a cat"], ["a watercolour", "at night, oil"]
    embeds, pooled = pipe.prompt_to_embedding(prompts, "blurry", prompt_2=prompts_2, negative_prompt_2="dark")
    want = references("encode", lambda: ref.encode_prompt(prompts, prompts_2, "cpu", 1, True, "blurry", "dark"))
    assert tuple(embeds.shape) == (4, 77, 80) and tuple(pooled.shape) == (4, 40)
    to_np = pipe.backend.to_numpy
    assert report("SDXL prompt_to_embedding vs encode_prompt (states)", rel_error(
        to_np(embeds), np.concatenate([want[1].numpy(), want[0].numpy()]))) < 1e-4
    assert report("SDXL prompt_to_embedding vs encode_prompt (pooled)", rel_error(
        to_np(pooled), np.concatenate([want[3].numpy(), want[2].numpy()]))) < 1e-4
    # Two prompts, prompt_2, no negative prompt (force_zeros_for_empty_prompt: zero unconditional branch)
    cases = [dict(prompt=prompts, prompt_2=prompts_2, latent=_noise((2, 4, 8, 10)), **MICRO),
             # one image (diffusers repeats [negative, positive] time ids over the batch, which mixes rows
             # when the negative ids differ and the batch is larger): every negative keyword
             dict(prompt="a lighthouse", negative_prompt="blurry", negative_prompt_2="dark",
                  latent=_noise((1, 4, 8, 10), 1), negative_original_size=(32, 40), negative_target_size=(64, 64),
                  negative_crops_coords_top_left=(4, 0), **MICRO)]
    pipe.enable_low_memory()  # both text encoders freed after each encoding and re-read when next needed
    for i, case in enumerate(cases):
        noise = case.pop("latent")
        want = references(("t2i", i), lambda: ref(**case, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                                                  latents=torch.from_numpy(noise), height=64, width=80).images)
        got = pipe(**case, num_inference_steps=2, guidance_scale=5.0, latent=noise, output_type="np")
        assert report(f"SDXL text-to-image vs StableDiffusionXLPipeline [{backend_name}]",
                      max_abs_error(got, want)) < IMAGE_TOL


# The SDXL conditioning and schedules are backend-neutral code: the torch variants of the ensemble and Turbo
# runs are slow; every SDXL network and text-to-image run both backends by default.
MLX_DEFAULT = pytest.mark.parametrize("backend_name", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])


@MLX_DEFAULT
def test_sdxl_ensemble_of_experts_matches_diffusers(sdxl, sdxl_refiner, pipelines, backend_name, references):
    """Base with denoising_end -> latents -> refiner (aesthetic scores, second encoder only) with
    denoising_start, vs StableDiffusionXLPipeline -> StableDiffusionXLImg2ImgPipeline."""
    (base_ref, base_root), (refiner_ref, refiner_root) = sdxl, sdxl_refiner
    base = pipelines.pipeline(TextToImageDiffusion, base_root, backend_name)
    refiner = pipelines.pipeline(ImageToImageDiffusion, refiner_root, backend_name)
    noise = _noise((1, 4, 8, 8), 2)
    common = dict(prompt="a lighthouse", num_inference_steps=4, guidance_scale=5.0)
    refine = dict(aesthetic_score=7.5, negative_aesthetic_score=1.0, negative_original_size=(40, 48),
                  negative_crops_coords_top_left=(2, 4), **MICRO)
    latent_ref = references("base", lambda: base_ref(**common, denoising_end=0.7, latents=torch.from_numpy(noise),
                                                     height=64, width=64, output_type="latent").images)
    want = references("refined", lambda: refiner_ref(**common, image=latent_ref, denoising_start=0.7,
                                                     output_type="np", **refine).images)
    latent = base(**common, denoising_end=0.7, latent=noise, output_type="latent")
    assert report(f"SDXL denoising_end latents vs StableDiffusionXLPipeline [{backend_name}]",
                  max_abs_error(latent, latent_ref.numpy())) < 1e-3
    got = refiner(latent, **common, denoising_start=0.7, output_type="np", **refine)
    assert report(f"SDXL refiner denoising_start vs StableDiffusionXLImg2ImgPipeline [{backend_name}]",
                  max_abs_error(got, want)) < IMAGE_TOL


@MLX_DEFAULT
def test_sdxl_turbo_one_step_matches_diffusers(sdxl, pipelines, backend_name, references):
    """SDXL-Turbo's recipe: Euler ancestral with trailing timesteps, one step, no guidance (diffusers'
    guidance_scale=0.0 turns guidance off; here exactly 1.0 does)."""
    ref, root = sdxl
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    pipe.set_scheduler("euler_ancestral", timestep_spacing="trailing")
    noise = _noise((1, 4, 8, 8), 3)
    scheduler = diffusers_scheduler_for(root, "euler_ancestral")
    scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing="trailing")
    want = references("turbo", lambda: diffusers_pipeline(ref, scheduler=scheduler)(
        "a cat", num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(noise), height=64, width=64,
        output_type="np").images)
    got = pipe("a cat", num_inference_steps=1, guidance_scale=1.0, latent=noise, output_type="np")
    assert report(f"SDXL-Turbo 1 step vs StableDiffusionXLPipeline [{backend_name}]",
                  max_abs_error(got, want)) < IMAGE_TOL


IMAGE_CASES = [("img2img", "mlx"), ("inpaint-9", "mlx"), pytest.param("blend", "mlx", marks=pytest.mark.slow)] + [
    pytest.param(case, "torch", marks=pytest.mark.slow) for case in ("img2img", "inpaint-9", "blend")]


@pytest.mark.parametrize("case,backend", IMAGE_CASES)
def test_sdxl_image_to_image_and_inpainting_match_diffusers(case, backend, sdxl, sdxl_inpaint, pipelines):
    """StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline (9-channel UNet, and latent
    blending on the base model), fed our noise and the posterior mean, non-default micro-conditioning."""
    (base_ref, base_root), (inpaint_ref, inpaint_root) = sdxl, sdxl_inpaint
    image, mask = make_image(64, 48), make_mask(64, 48)
    noise = _noise((1, 4, 6, 8), 4)
    common = dict(num_inference_steps=4, strength=0.6, guidance_scale=5.0, negative_prompt="blurry",
                  prompt_2="in winter", **MICRO)
    if case == "img2img":
        ref = diffusers_pipeline(base_ref, "StableDiffusionXLImg2ImgPipeline")
        want = run_diffusers(ref, noise, prompt="a cat", image=image, **common)
        got = pipelines.pipeline(ImageToImageDiffusion, base_root, backend)(image, "a cat", noise=noise,
                                                                           output_type="np", **common)
    else:
        ref = inpaint_ref if case == "inpaint-9" else diffusers_pipeline(base_ref, "StableDiffusionXLInpaintPipeline")
        root = inpaint_root if case == "inpaint-9" else base_root
        want = run_diffusers(ref, noise, prompt="a cat", image=image, mask_image=mask, height=48, width=64, **common)
        got = pipelines.pipeline(InpaintDiffusion, root, backend)("a cat", image, mask, noise=noise,
                                                                  output_type="np", **common)
    assert report(f"SDXL {case} vs diffusers' SDXL pipeline [{backend}]", max_abs_error(got, want)) < IMAGE_TOL


@MLX_DEFAULT
def test_sdxl_inpainting_ensemble_of_experts_matches_diffusers(sdxl, sdxl_refiner, pipelines, backend_name):
    """Inpainting base (latent blending) with denoising_end -> latents -> refiner inpainting (aesthetic scores)
    with denoising_start on those latents, vs StableDiffusionXLInpaintPipeline twice, our noise fed to both."""
    import importlib

    (base_ref, base_root), (refiner_ref, refiner_root) = sdxl, sdxl_refiner
    image, mask = make_image(32, 32), make_mask(32, 32)
    noise = _noise((1, 4, 4, 4), 5)
    common = dict(prompt="a cat", num_inference_steps=4, guidance_scale=5.0, negative_prompt="blurry")
    refine = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, negative_original_size=(40, 48),
                  negative_crops_coords_top_left=(2, 4), **MICRO)  # every negative value given: diffusers' ids
    module = importlib.import_module(type(diffusers_pipeline(base_ref, "StableDiffusionXLInpaintPipeline")).__module__)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(module, "retrieve_latents", lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
        mp.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise))
        latent_ref = diffusers_pipeline(base_ref, "StableDiffusionXLInpaintPipeline")(
            **common, image=image, mask_image=mask, height=32, width=32, strength=1.0, denoising_end=0.6,
            output_type="latent").images
        ref = diffusers_pipeline(refiner_ref, "StableDiffusionXLInpaintPipeline")
        ref.register_to_config(requires_aesthetics_score=True)  # a new object: the session's is untouched
        want = ref(
            **common, image=latent_ref, mask_image=mask, height=32, width=32, denoising_start=0.6,
            output_type="np", **refine).images
    base = pipelines.pipeline(InpaintDiffusion, base_root, backend_name)
    latent = base(common["prompt"], image, mask, **{k: v for k, v in common.items() if k != "prompt"}, noise=noise,
                  denoising_end=0.6, output_type="latent")
    assert report(f"SDXL inpainting denoising_end latents vs StableDiffusionXLInpaintPipeline [{backend_name}]",
                  max_abs_error(latent, latent_ref.numpy())) < 1e-3
    refiner = pipelines.pipeline(InpaintDiffusion, refiner_root, backend_name)
    got = refiner(common["prompt"], latent, mask, **{k: v for k, v in common.items() if k != "prompt"}, noise=noise,
                  denoising_start=0.6, output_type="np", **refine)
    assert report(f"SDXL refiner inpainting denoising_start vs StableDiffusionXLInpaintPipeline [{backend_name}]",
                  max_abs_error(got, want)) < IMAGE_TOL


def test_negative_micro_conditioning_defaults_to_the_positive_values():
    from mlx_stablefused.pipelines.sdxl_conditioning import MicroConditioning

    micro = MicroConditioning(original_size=(96, 80), crops_coords_top_left=(8, 16), negative_original_size=(32, 40))
    assert micro.time_ids(64, 48, aesthetic=False) == ([96, 80, 8, 16, 64, 48], [32, 40, 8, 16, 64, 48])
    assert micro.time_ids(64, 48, aesthetic=True) == ([96, 80, 8, 16, 6.0], [32, 40, 8, 16, 2.5])
    given = MicroConditioning(negative_crops_coords_top_left=(0, 4), negative_target_size=(8, 8))
    assert given.time_ids(64, 48, aesthetic=False) == ([64, 48, 0, 0, 64, 48], [64, 48, 0, 4, 8, 8])


def test_sdxl_bad_input_is_refused_before_work(sdxl, sdxl_refiner, sdxl_inpaint, sd1, pipelines):
    _, root = sdxl
    pipe = pipelines.pipeline(TextToImageDiffusion, root)
    bad = [(dict(original_size=(64,)), "original_size must be a pair"),
           (dict(target_size="64x64"), "target_size must be a pair"),
           (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left must be a non-negative integer"),
           (dict(negative_target_size=(64, 0)), "negative_target_size must be a positive integer"),
           (dict(prompt_2=3), "prompt_2 must be a string or a non-empty list"),
           (dict(denoising_end=1.0), "denoising_end must be a fraction strictly between 0 and 1")]
    for kwargs, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            pipe("a cat", num_inference_steps=1, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'aesthetic_score'"):
        pipe("a cat", num_inference_steps=1, aesthetic_score=6.0)  # an image pipeline keyword
    refiner = pipelines.pipeline(TextToImageDiffusion, sdxl_refiner[1])
    with pytest.raises(UnsupportedModelError, match="refiner .*use ImageToImageDiffusion"):
        refiner("a cat", num_inference_steps=1)
    sd = pipelines.pipeline(TextToImageDiffusion, sd1[1])
    with pytest.raises(ValueError, match="prompt_2, original_size: only SDXL models take these"):
        sd("a cat", num_inference_steps=1, original_size=(64, 64), prompt_2="x")
    i2i = pipelines.pipeline(ImageToImageDiffusion, root)
    with pytest.raises(ValueError, match="aesthetic_score must be a real number"):
        i2i(make_image(), "a cat", num_inference_steps=2, aesthetic_score="high")
    with pytest.raises(ValueError, match="denoising_start or start_step/strength, not both"):
        i2i(make_image(), "a cat", num_inference_steps=2, strength=0.5, denoising_start=0.5)
    nine = pipelines.pipeline(InpaintDiffusion, sdxl_inpaint[1])
    with pytest.raises(UnsupportedModelError, match="9-channel inpainting UNet takes the masked image itself"):
        nine("a cat", _noise((1, 4, 6, 8)), make_mask(64, 48), denoising_start=0.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="denoising_start or start_step/strength, not both"):
        nine("a cat", make_image(64, 48), make_mask(64, 48), denoising_start=0.5, strength=0.5)
    walk = pipelines.pipeline(LatentWalkDiffusion, sdxl_refiner[1])
    with pytest.raises(UnsupportedModelError, match="refiner .*use ImageToImageDiffusion"):
        walk.interpolate(["a", "b"], interpolation_steps=2, num_inference_steps=1)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'aesthetic_score'"):
        pipelines.pipeline(LatentWalkDiffusion, root)("a", _noise((1, 4, 4, 4)), aesthetic_score=6.0)


@pytest.mark.slow
def test_sdxl_latent_walk_at_strength_zero_is_text_to_image(sdxl, pipelines):
    """On SDXL a walk at strength 0 is text-to-image on the re-standardised latent (same micro-conditioning
    and prompt_2)."""
    t2i = pipelines.pipeline(TextToImageDiffusion, sdxl[1])
    walk = LatentWalkDiffusion.from_pipeline(t2i)
    base = _noise((1, 4, 4, 6), 7)
    extra = dict(prompt_2="oil painting", original_size=(40, 56), negative_prompt="blurry", num_inference_steps=2,
                 guidance_scale=5.0, output_type="np")
    walked = walk("a lighthouse", base, strength=0.0, noise=_noise(base.shape, 8), **extra)
    plain = t2i("a lighthouse", latent=walk.modify_latent(base, 0.0, _noise(base.shape, 8)), **extra)
    assert max_abs_error(walked, plain) < 1e-5


def test_sdxl_interpolation_matches_diffusers_on_interpolated_embeddings(sdxl, pipelines):
    """SDXL interpolation frames are StableDiffusionXLPipeline fed the lerped states, pooled embeddings and
    latents (MLX)."""
    ref, root = sdxl
    walk = pipelines.pipeline(LatentWalkDiffusion, root)
    prompts, latents = ["a red lighthouse", "a cat at night"], _noise((2, 4, 4, 6), 9)
    frames = walk.interpolate(prompts, latent=latents, negative_prompt="blurry", interpolation_steps=2,
                              latent_interpolation_type="lerp", num_inference_steps=2, guidance_scale=5.0,
                              output_type="np", batch_size=3)
    w = np.array([0.0, 0.5, 1.0], np.float32)

    def lerped(pair):
        a, b = pair.numpy()
        return torch.from_numpy(((1 - w).reshape(-1, *[1] * a.ndim) * a + w.reshape(-1, *[1] * a.ndim) * b)
                                .astype(np.float32))

    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(prompts, None, "cpu", 1, True, "blurry")
        want = ref(prompt_embeds=lerped(embeds), negative_prompt_embeds=lerped(negative),
                   pooled_prompt_embeds=lerped(pooled), negative_pooled_prompt_embeds=lerped(negative_pooled),
                   latents=lerped(torch.from_numpy(latents)), height=32, width=48, num_inference_steps=2,
                   guidance_scale=5.0, output_type="np").images
    assert report("SDXL interpolation frames vs StableDiffusionXLPipeline (lerped embeddings)",
                  max_abs_error(frames, want)) < IMAGE_TOL


@pytest.mark.slow
def test_sdxl_inpainting_walk_ends_on_the_painted_image(sdxl, pipelines):
    """An inpainting walk on SDXL (latent blending): its last frame is the inpainting call it makes."""
    from mlx_stablefused.pipelines import inputs
    from mlx_stablefused.pipelines.walk_geometry import WalkType, shift_and_mask

    inpaint = pipelines.pipeline(InpaintDiffusion, sdxl[1])
    image = make_image(64, 64)
    frames = inpaint.walk("a cat", image, "right", image_height=64, image_width=64, width_translation_per_step=16,
                          num_inpainting_steps=1, interpolation_steps=3, num_inference_steps=2, seed=4)
    source, mask = shift_and_mask(image.convert("RGB"), WalkType.RIGHT, 16)
    seed = int(inputs.make_rng(4).integers(0, 2**31 - 1, size=1)[0])
    painted = inpaint("a cat", source, mask, num_inference_steps=2, seed=seed, output_type="pil")[0]
    assert len(frames) == 3 and np.array_equal(np.asarray(frames[-1]), np.asarray(painted))


# ---------------------------------------------------------------------------------- AnimateDiff-SDXL
@pytest.fixture(scope="module")
def sdxl_motion(sdxl, tmp_path_factory):
    """A MotionAdapter shaped as mm_sdxl_v10_beta is for SDXL (one motion module per resnet of the three SDXL
    blocks, no mid-block module), at the tiny SDXL's widths, every parameter random; its folder, the same as
    an original AnimateDiff .ckpt, and diffusers' AnimateDiffSDXLPipeline video (our noise, 3 frames)."""
    import diffusers
    from tiny_models import randomize, to_original_format

    from mlx_stablefused import ANIMATEDIFF_DDIM

    ref, root = sdxl
    folder = tmp_path_factory.mktemp("sdxl-motion")
    adapter = randomize(diffusers.MotionAdapter(
        block_out_channels=ref.unet.config.block_out_channels, motion_layers_per_block=ref.unet.config.layers_per_block,
        motion_num_attention_heads=2, motion_norm_num_groups=4, motion_max_seq_length=32, use_motion_mid_block=False), 8)
    adapter.save_pretrained(str(folder / "adapter"))
    torch.save({"state_dict": to_original_format(adapter.state_dict(), 32)}, folder / "mm_sdxl_tiny.ckpt")
    unet = diffusers.UNetMotionModel.from_unet2d(ref.unet, adapter)
    # from_unet2d leaves the SDXL add_embedding at random init (huggingface/diffusers PR #6721 review, deferred)
    unet.add_embedding.load_state_dict(ref.unet.add_embedding.state_dict())
    config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
    pipe = diffusers.AnimateDiffSDXLPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2, tokenizer=ref.tokenizer,
        tokenizer_2=ref.tokenizer_2, unet=unet, motion_adapter=adapter,
        scheduler=diffusers.DDIMScheduler.from_config({**config, **ANIMATEDIFF_DDIM}))
    pipe.set_progress_bar_config(disable=True)
    noise = _noise((1, 4, 3, 4, 4), 10)
    with torch.no_grad():
        video = pipe("a cat walking", negative_prompt="blurry", latents=torch.from_numpy(noise), num_frames=3,
                     height=32, width=32, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                     original_size=(40, 48), target_size=(32, 32)).frames
    return folder, noise, np.asarray(video)


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["mlx", "torch"])
def test_animatediff_sdxl_matches_diffusers(sdxl, sdxl_motion, backend_name):
    """AnimateDiff on SDXL: the motion modules merged into the text_time UNet (its pooled text and time ids
    per frame) vs AnimateDiffSDXLPipeline."""
    from mlx_stablefused import TextToVideoDiffusion

    folder, noise, want = sdxl_motion
    pipe = TextToVideoDiffusion(sdxl[1], motion_adapter=folder / "adapter", backend=backend_name, progress=False)
    got = pipe("a cat walking", negative_prompt="blurry", latent=noise, num_inference_steps=2, guidance_scale=5.0,
               output_type="np", original_size=(40, 48))
    assert report(f"AnimateDiff-SDXL vs AnimateDiffSDXLPipeline [{backend_name}] (max abs)",
                  max_abs_error(got, want)) < IMAGE_TOL


@pytest.mark.slow
def test_animatediff_sdxl_original_checkpoint_equals_its_folder(sdxl, sdxl_motion):
    from mlx_stablefused import TextToVideoDiffusion

    folder, noise, want = sdxl_motion
    pipe = TextToVideoDiffusion(sdxl[1], motion_adapter=folder / "mm_sdxl_tiny.ckpt", progress=False,
                                motion_adapter_config={"motion_num_attention_heads": 2, "motion_norm_num_groups": 4})
    got = pipe("a cat walking", negative_prompt="blurry", latent=noise, num_inference_steps=2, guidance_scale=5.0,
               output_type="np", original_size=(40, 48))
    assert max_abs_error(got, want) < IMAGE_TOL


@pytest.mark.slow
def test_sdxl_guidance_sweep_is_text_to_image_per_value(sdxl, pipelines):
    """guidance_sweep on an SDXL pipeline passes its SDXL keywords through: each value equals the direct call."""
    from mlx_stablefused import guidance_sweep

    t2i = pipelines.pipeline(TextToImageDiffusion, sdxl[1])
    call = dict(prompt="a lighthouse", prompt_2="oil painting", original_size=(40, 40), image_height=32,
                image_width=32, num_inference_steps=2, output_type="np")
    swept = guidance_sweep(t2i, [0.0, 5.0], seed=3, **call)
    for scale, image in zip((0.0, 5.0), swept):
        assert np.array_equal(image, t2i(guidance_scale=scale, seed=3, **call))
