"""SDXL pipelines vs diffusers' StableDiffusionXL pipelines on the tiny SDXL models, both backends:
two-encoder prompts (prompt_2, negative_prompt_2, force_zeros_for_empty_prompt), non-default
micro-conditioning, the refiner's aesthetic score, the base-to-refiner ensemble of experts, Turbo."""

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, max_abs_error, rel_error, report

from mlx_stablefused import TextToImageDiffusion
from mlx_stablefused.errors import UnsupportedModelError

IMAGE_TOL = 5e-3
MICRO = dict(original_size=(96, 80), crops_coords_top_left=(8, 16), target_size=(72, 48))


def _noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_sdxl_text_to_image_matches_diffusers(sdxl, pipelines, backend_name):
    ref, root = sdxl
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    # prompt_to_embedding vs encode_prompt: [uncond; cond] states (2B, 77, 32 + 48) and pooled (2B, 40)
    prompts, prompts_2 = ["a red lighthouse", "a cat"], ["a watercolour", "at night, oil"]
    embeds, pooled = pipe.prompt_to_embedding(prompts, "blurry", prompt_2=prompts_2, negative_prompt_2="dark")
    with torch.no_grad():
        want = ref.encode_prompt(prompts, prompts_2, "cpu", 1, True, "blurry", "dark")
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
             dict(prompt="a lighthouse", negative_prompt="blurry", negative_prompt_2="dark", latent=_noise((1, 4, 8, 10), 1),
                  negative_original_size=(32, 40), negative_target_size=(64, 64), negative_crops_coords_top_left=(4, 0),
                  **MICRO)]
    for case in cases:
        noise = case.pop("latent")
        with torch.no_grad():
            want = ref(**case, num_inference_steps=2, guidance_scale=5.0, latents=torch.from_numpy(noise),
                       output_type="np", height=64, width=80).images
        got = pipe(**case, num_inference_steps=2, guidance_scale=5.0, latent=noise, output_type="np")
        assert report(f"SDXL text-to-image vs StableDiffusionXLPipeline [{backend_name}]",
                      max_abs_error(got, want)) < IMAGE_TOL
