"""IP-Adapter: our images against diffusers' ``load_ip_adapter`` on the tiny models, the image encoder
against transformers' CLIPVisionModelWithProjection, the preprocessing against CLIPImageProcessor, and the
refusals. The adapter files and the image encoder are built here (tests/ip_adapter_files.py) in
h94/IP-Adapter's layout; diffusers loads them itself, so the layout is checked by the oracle.
"""

import copy

import numpy as np
import pytest
import torch
from helpers import rel_error, report
from ip_adapter_files import build_image_encoder, build_ip_adapter, ip_adapter_state, ip_image

from mlx_stablefused import TextToImageDiffusion
from mlx_stablefused.backends.base import as_numpy
from mlx_stablefused.errors import ModelSourceError
from mlx_stablefused import IPAdapterError

SIZE = 32
# One DDIM step from t = 999 ("trailing"): the result is the UNet's guided prediction; compared as latents.
RUN = dict(prompt="a photo of the cat", negative_prompt="blurry", num_inference_steps=1, guidance_scale=7.5)
WEIGHTS = dict(subfolder="models", weight_name="ip-adapter_tiny.safetensors")
SCALE = 0.6
TOL = 1e-4  # relative, on the final latents


def latents(frames=None):
    shape = (1, 4, SIZE // 8, SIZE // 8) if frames is None else (1, 4, frames, SIZE // 8, SIZE // 8)
    return np.random.default_rng(3).standard_normal(shape).astype(np.float32)


def trailing_ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, timestep_spacing="trailing")


@pytest.fixture(scope="module")
def adapter_root(sd1, tmp_path_factory):
    """The h94-style folder: models/ip-adapter_tiny.safetensors (and .bin, the same tensors), models/image_encoder."""
    root = tmp_path_factory.mktemp("ip-adapter")
    build_ip_adapter(root, sd1[0].unet)
    build_ip_adapter(root, sd1[0].unet, weight_name="ip-adapter_tiny.bin")
    return root


@pytest.fixture(scope="module")
def reference(sd1, adapter_root):
    """diffusers' StableDiffusionPipeline with our file loaded by its own load_ip_adapter: the image at
    SCALE, and the embeddings it prepares (for the ip_adapter_image_embeds path)."""
    from diffusers import StableDiffusionPipeline

    pipe = sd1[0]
    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=copy.deepcopy(pipe.unet), scheduler=trailing_ddim(pipe.scheduler.config),
                                  safety_checker=None, feature_extractor=None, image_encoder=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(adapter_root), **WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    with torch.no_grad():
        image = ref(latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="latent",
                    ip_adapter_image=ip_image(), **RUN).images.numpy()
        embeds = ref.prepare_ip_adapter_image_embeds(ip_image(), None, "cpu", 1, True)
    return {"image": image, "embeds": [e.numpy() for e in embeds]}


def test_ip_adapter_matches_diffusers(sd1, adapter_root, reference, pipelines, backend_name):
    """Scale 0 gives exactly the plain model's image; scale 0.6 diffusers' image (from the image, from the
    .bin file, from diffusers' own prepared embeddings); unloading gives the plain model back."""
    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], backend_name)
    pipe.set_scheduler("ddim", timestep_spacing="trailing")

    def run(**call):
        return as_numpy(pipe(latent=latents(), output_type="latent", **RUN, **call))

    first = run()  # MLX's first run in a process can differ from the later ones in the last bits (~1e-6 rel)
    try:
        pipe.load_ip_adapter(str(adapter_root), **WEIGHTS)
        pipe.set_ip_adapter_scale(0.0)
        zero = run(ip_adapter_image=ip_image())
        pipe.set_ip_adapter_scale(SCALE)
        got = run(ip_adapter_image=ip_image())
        assert report(f"IP-Adapter scale 0.6 vs diffusers (rel, latents) [{backend_name}]",
                      rel_error(got, reference["image"])) < TOL
        assert rel_error(got, zero) > 0.05  # the adapter changes the result
        assert rel_error(run(ip_adapter_image_embeds=reference["embeds"]), got) < 1e-5
        pipe.load_ip_adapter([str(adapter_root)], subfolder="models", weight_name=["ip-adapter_tiny.bin"])  # lists
        assert pipe.ip_adapter.scale == 1.0  # a new adapter starts at scale 1, as diffusers
        pipe.set_ip_adapter_scale([SCALE])
        assert rel_error(run(ip_adapter_image=[ip_image()]), got) < 1e-5
    finally:
        if pipe.ip_adapter is not None:
            pipe.unload_ip_adapter()
    plain = run()
    assert np.array_equal(zero, plain) and rel_error(first, plain) < 1e-5  # scale 0 and unloaded: no adapter


def test_image_encoder_and_preprocessing_match_transformers(adapter_root, backend_name):
    """Our CLIPVisionModelWithProjection (image_embeds, penultimate hidden states) vs transformers' < 1e-4
    relative; our CLIPImageProcessor preprocessing equals transformers' (several sizes and aspects)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from mlx_stablefused.clip_image_processing import clip_pixels
    from mlx_stablefused.model_description import IMAGE_ENCODER
    from mlx_stablefused.model_loading import load_network

    images = [ip_image(1, (56, 40)), ip_image(2, (31, 77)), ip_image(3, (32, 32))]
    expected = CLIPImageProcessor(size=32, crop_size=32)(images, return_tensors="np").pixel_values
    pixels = clip_pixels(images, 32)
    assert np.array_equal(pixels, expected)
    folder = adapter_root / "models" / "image_encoder"
    ref = CLIPVisionModelWithProjection.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels), output_hidden_states=True)
    if backend_name == "mlx":
        import mlx.core as mx

        from mlx_stablefused.backends.mlx.loading import NETWORKS

        ours = load_network(folder, "image_encoder", NETWORKS, description=IMAGE_ENCODER)(
            mx.array(pixels.transpose(0, 2, 3, 1)), output_hidden_states=True)
    else:
        from mlx_stablefused.backends.torch.loading import TorchNetworks

        with torch.no_grad():
            ours = load_network(folder, "image_encoder", TorchNetworks(), description=IMAGE_ENCODER)(
                torch.from_numpy(pixels), output_hidden_states=True)
    as_np = (lambda a: np.array(a)) if backend_name == "mlx" else (lambda a: a.numpy())
    assert report(f"CLIP image encoder image_embeds vs transformers (rel) [{backend_name}]",
                  rel_error(as_np(ours.image_embeds), out.image_embeds.numpy())) < 1e-4
    assert rel_error(as_np(ours.hidden_states[-2]), out.hidden_states[-2].numpy()) < 1e-4


def test_bad_ip_adapter_input_is_refused_before_work(sd1, sd2, adapter_root, pipelines, tmp_path, monkeypatch):
    """Each refusal names the thing and comes before any network runs (the prompt is never encoded)."""
    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], "mlx")
    run = dict(latent=latents(), output_type="np", **RUN)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the input was refused")

    monkeypatch.setattr(pipe, "encode_prompt", no_work)
    with pytest.raises(IPAdapterError, match="no IP-Adapter is loaded"):
        pipe(ip_adapter_image=ip_image(), **run)
    # An adapter without its image encoder: the missing folder is named.
    bare = tmp_path / "bare"
    build_ip_adapter(bare, sd1[0].unet, encoder=False)
    with pytest.raises(ModelSourceError, match=r"has no image encoder: .*bare/models/image_encoder"):
        pipe.load_ip_adapter(str(bare), **WEIGHTS)
    # An adapter for another base: its token width is named (SDXL-like 48-wide text here).
    state = ip_adapter_state(sd1[0].unet, 24)
    state["image_proj.proj.weight"] = torch.zeros(4 * 48, 24)
    state["image_proj.proj.bias"], state["image_proj.norm.weight"] = torch.zeros(4 * 48), torch.ones(48)
    state["image_proj.norm.bias"] = torch.zeros(48)
    with pytest.raises(IPAdapterError, match="another base model: its image tokens are 48 wide.*32-wide"):
        pipe.load_ip_adapter(state, image_encoder_folder=None)
    # An adapter for another UNet of the same width (sd2's layers: their count is named).
    with pytest.raises(IPAdapterError, match="decoupled attention weights for 14 cross-attention layers, this UNet "
                                             "has 11"):
        pipe.load_ip_adapter(ip_adapter_state(sd2[0].unet, 24), image_encoder_folder=None)
    # An image encoder of another width than the projection takes.
    wide = tmp_path / "wide"
    build_ip_adapter(wide, sd1[0].unet, encoder=False)
    build_image_encoder(wide / "models" / "image_encoder", projection_dim=20)
    with pytest.raises(IPAdapterError, match="gives 20-wide image embeddings.*projects 24-wide"):
        pipe.load_ip_adapter(str(wide), **WEIGHTS)
    with pytest.raises(IPAdapterError, match="2 entries in weight_name; one IP-Adapter at a time"):
        pipe.load_ip_adapter(str(adapter_root), subfolder="models", weight_name=["a.safetensors", "b.safetensors"])
    assert pipe.ip_adapter is None  # nothing was attached by the refused loads
    try:
        pipe.load_ip_adapter(str(adapter_root), **WEIGHTS)
        with pytest.raises(ValueError, match="ip_adapter_image has 2 entries for 1 loaded IP-Adapter"):
            pipe(ip_adapter_image=[ip_image(), ip_image()], **run)
        with pytest.raises(IPAdapterError, match="an IP-Adapter is loaded .*pass ip_adapter_image"):
            pipe(**run)
        with pytest.raises(ValueError, match="not both"):
            pipe(ip_adapter_image=ip_image(), ip_adapter_image_embeds=[np.zeros((2, 1, 24))], **run)
        with pytest.raises(ValueError, match=r"ip_adapter_image_embeds\[0\] must be \(batch, images, D\) with D = 24"):
            pipe(ip_adapter_image_embeds=[np.zeros((2, 1, 16))], **run)
        with pytest.raises(ValueError, match="ip_adapter_scale must be finite"):
            pipe.set_ip_adapter_scale(float("nan"))
        with pytest.raises(IPAdapterError, match="this call takes no image prompt"):  # not run without it
            pipe.embedding_to_latent(pipe.prompt_to_embedding("x"), SIZE, SIZE, 1, 7.5, 0.0)
        pipe.load_ip_adapter(str(adapter_root), image_encoder_folder=None, **WEIGHTS)
        with pytest.raises(IPAdapterError, match="without its image encoder .*ip_adapter_image_embeds"):
            pipe(ip_adapter_image=ip_image(), **run)
    finally:
        if pipe.ip_adapter is not None:
            pipe.unload_ip_adapter()


# ------------------------------------------------------------------ the other pipelines (-m slow)
@pytest.mark.slow
def test_sdxl_ip_adapter_matches_diffusers(sdxl, pipelines, backend_name, tmp_path):
    """An IP-Adapter for the tiny SDXL (80-wide tokens; the UNet's depth-2 transformers numbered as
    diffusers numbers them) on StableDiffusionXLPipeline vs ours, text-to-image."""
    from diffusers import StableDiffusionXLPipeline

    pipe, root = sdxl
    build_ip_adapter(tmp_path, pipe.unet)
    ref = StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), **WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    noise = latents()
    with torch.no_grad():
        want = ref(prompt="a lighthouse", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                   latents=torch.from_numpy(noise), height=SIZE, width=SIZE, output_type="latent",
                   ip_adapter_image=ip_image()).images.numpy()
    ours = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    try:
        ours.load_ip_adapter(str(tmp_path), **WEIGHTS)
        ours.set_ip_adapter_scale(SCALE)
        got = as_numpy(ours("a lighthouse", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                            latent=noise, output_type="latent", ip_adapter_image=ip_image()))
        ours.set_ip_adapter_scale(0.0)
        plain = as_numpy(ours("a lighthouse", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                              latent=noise, output_type="latent", ip_adapter_image=ip_image()))
    finally:
        ours.unload_ip_adapter()
    assert report(f"SDXL IP-Adapter vs StableDiffusionXLPipeline (rel, latents) [{backend_name}]",
                  rel_error(got, want)) < TOL
    assert rel_error(got, plain) > 0.05


@pytest.mark.slow
def test_animatediff_ip_adapter_matches_diffusers(sd1, motion_adapters, adapter_root, pipelines, backend_name):
    """AnimateDiff with an image prompt (its tokens for every frame) vs AnimateDiffPipeline.load_ip_adapter."""
    import diffusers

    from mlx_stablefused import ANIMATEDIFF_DDIM, TextToVideoDiffusion

    pipe, root = sd1
    config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
    options = {k: v for k, v in ANIMATEDIFF_DDIM.items() if k in diffusers.DDIMScheduler._get_init_keys(
        diffusers.DDIMScheduler)}
    ref = diffusers.AnimateDiffPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                        unet=copy.deepcopy(pipe.unet), motion_adapter=motion_adapters[True][0],
                                        scheduler=diffusers.DDIMScheduler.from_config(config, **options))
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(adapter_root), **WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    noise = latents(frames=4)
    with torch.no_grad():
        want = ref(prompt="a cat walking", negative_prompt="blurry", num_frames=4, height=SIZE, width=SIZE,
                   num_inference_steps=2, guidance_scale=7.5, latents=torch.from_numpy(noise), output_type="latent",
                   ip_adapter_image=ip_image()).frames.numpy()
    ours = pipelines.pipeline(TextToVideoDiffusion, root, backend_name, motion_adapter=motion_adapters[True][1])
    ours.set_scheduler("ddim", **ANIMATEDIFF_DDIM)
    try:
        ours.load_ip_adapter(str(adapter_root), **WEIGHTS)
        ours.set_ip_adapter_scale(SCALE)
        got = as_numpy(ours("a cat walking", negative_prompt="blurry", latent=noise, num_inference_steps=2,
                            guidance_scale=7.5, output_type="latent", ip_adapter_image=ip_image()))
    finally:
        ours.unload_ip_adapter()
    assert report(f"AnimateDiff IP-Adapter vs AnimateDiffPipeline (rel, latents) [{backend_name}]",
                  rel_error(got, want)) < TOL


@pytest.mark.slow
def test_image_to_image_ip_adapter_matches_diffusers(sd1, adapter_root, pipelines, backend_name):
    """Image-to-image with an image prompt vs StableDiffusionImg2ImgPipeline.load_ip_adapter."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from test_parity_image_pipelines import make_image, run_diffusers

    from mlx_stablefused import ImageToImageDiffusion

    pipe, root = sd1
    ref = StableDiffusionImg2ImgPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=copy.deepcopy(pipe.unet), scheduler=trailing_ddim(pipe.scheduler.config),
                                         safety_checker=None, feature_extractor=None, image_encoder=None,
                                         requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(adapter_root), **WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    noise = latents()
    image = make_image(SIZE, SIZE)
    want = run_diffusers(ref, noise, image=image, strength=0.75, ip_adapter_image=ip_image(), prompt=RUN["prompt"],
                         negative_prompt=RUN["negative_prompt"], num_inference_steps=4, guidance_scale=7.5)
    ours = pipelines.pipeline(ImageToImageDiffusion, root, backend_name)
    ours.set_scheduler("ddim", timestep_spacing="trailing")
    try:
        ours.load_ip_adapter(str(adapter_root), **WEIGHTS)
        ours.set_ip_adapter_scale(SCALE)
        got = ours(image, RUN["prompt"], negative_prompt=RUN["negative_prompt"], num_inference_steps=4,
                   guidance_scale=7.5, strength=0.75, noise=noise, output_type="np", ip_adapter_image=ip_image())
    finally:
        ours.unload_ip_adapter()
    assert report(f"image-to-image IP-Adapter vs StableDiffusionImg2ImgPipeline (max abs) [{backend_name}]",
                  float(np.abs(got - want).max())) < 5e-3


def test_plus_resampler_matches_diffusers(sd1, backend_name):
    """IP-Adapter Plus's resampler from the original keys (to_kv split, norm1/norm2) vs diffusers' own
    conversion of the same tensors into IPAdapterPlusImageProjection, on random hidden states."""
    from ip_adapter_files import ENCODER, PLUS

    from mlx_stablefused.ip_adapter import parse_ip_adapter, split_state
    from mlx_stablefused.topology import unet_plan
    from mlx_stablefused.config import UNetConfig

    unet = sd1[0].unet
    state = ip_adapter_state(unet, ENCODER["hidden_size"], plus=True)
    image_proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    ref = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False).eval()
    states = np.random.default_rng(0).standard_normal((2, 17, ENCODER["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(states)).numpy()
    config = UNetConfig.from_dict(dict(unet.config))
    adapter = parse_ip_adapter(split_state(state, "plus"), "plus", unet_plan(config), config.cross_attention_dim)
    assert adapter.num_tokens == PLUS["queries"] and adapter.projection.heads == PLUS["inner"] // 64
    if backend_name == "mlx":
        import mlx.core as mx

        from mlx_stablefused.backends.mlx.ip_adapter import Resampler, assign

        module = assign(Resampler(adapter.projection), adapter.image_proj, mx.float32, "plus", "Resampler")
        got = np.array(module(mx.array(states)))
    else:
        from mlx_stablefused.backends.torch.ip_adapter import Resampler, assign

        module = assign(Resampler(adapter.projection), adapter.image_proj, torch.device("cpu"), torch.float32,
                        "plus", "Resampler")
        with torch.no_grad():
            got = module(torch.from_numpy(states)).numpy()
    assert report(f"IP-Adapter Plus resampler vs IPAdapterPlusImageProjection (rel) [{backend_name}]",
                  rel_error(got, want)) < 1e-5


@pytest.mark.slow
def test_plus_ip_adapter_matches_diffusers(sd1, pipelines, backend_name, tmp_path):
    """IP-Adapter Plus end to end (penultimate hidden states; a zero image's for the unconditional branch) vs
    StableDiffusionPipeline.load_ip_adapter."""
    from diffusers import StableDiffusionPipeline

    pipe, root = sd1
    build_ip_adapter(tmp_path, pipe.unet, weight_name="ip-adapter-plus_tiny.safetensors", plus=True)
    weights = dict(subfolder="models", weight_name="ip-adapter-plus_tiny.safetensors")
    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=copy.deepcopy(pipe.unet), scheduler=trailing_ddim(pipe.scheduler.config),
                                  safety_checker=None, feature_extractor=None, image_encoder=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), **weights)
    ref.set_ip_adapter_scale(SCALE)
    with torch.no_grad():
        want = ref(latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="latent",
                   ip_adapter_image=ip_image(), **RUN).images.numpy()
        embeds = [e.numpy() for e in ref.prepare_ip_adapter_image_embeds(ip_image(), None, "cpu", 1, True)]
    ours = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    ours.set_scheduler("ddim", timestep_spacing="trailing")
    try:
        ours.load_ip_adapter(str(tmp_path), **weights)
        ours.set_ip_adapter_scale(SCALE)
        got = as_numpy(ours(latent=latents(), output_type="latent", ip_adapter_image=ip_image(), **RUN))
        from_embeds = as_numpy(ours(latent=latents(), output_type="latent", ip_adapter_image_embeds=embeds, **RUN))
        ours.set_ip_adapter_scale(0.0)
        plain = as_numpy(ours(latent=latents(), output_type="latent", ip_adapter_image=ip_image(), **RUN))
    finally:
        ours.unload_ip_adapter()
    assert report(f"IP-Adapter Plus vs StableDiffusionPipeline (rel, latents) [{backend_name}]",
                  rel_error(got, want)) < TOL
    assert rel_error(from_embeds, got) < 1e-5 and rel_error(got, plain) > 0.05


@pytest.mark.parametrize("backend_name", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])
def test_ip_adapter_with_controlnet_matches_diffusers(sd1, adapter_root, pipelines, backend_name, tmp_path):
    """An image prompt and a ControlNet at once vs StableDiffusionControlNetPipeline.load_ip_adapter: the image
    tokens go to the UNet only (diffusers' ControlNet sees the text alone)."""
    from diffusers import StableDiffusionControlNetPipeline
    from tiny_controlnets import build_controlnet, control_image

    pipe, root = sd1
    net = build_controlnet(pipe.unet, 31)
    net.save_pretrained(str(tmp_path / "controlnet"), safe_serialization=True)
    ref = StableDiffusionControlNetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                            unet=copy.deepcopy(pipe.unet), controlnet=net,
                                            scheduler=trailing_ddim(pipe.scheduler.config), safety_checker=None,
                                            feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(adapter_root), **WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    edges = control_image(SIZE, SIZE)
    with torch.no_grad():
        want = ref(latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="latent", image=edges,
                   controlnet_conditioning_scale=0.8, ip_adapter_image=ip_image(), **RUN).images.numpy()
    ours = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    ours.set_scheduler("ddim", timestep_spacing="trailing")
    ours.set_controlnet(str(tmp_path / "controlnet"))
    try:
        ours.load_ip_adapter(str(adapter_root), **WEIGHTS)
        ours.set_ip_adapter_scale(SCALE)
        got = as_numpy(ours(latent=latents(), output_type="latent", control_image=edges,
                            controlnet_conditioning_scale=0.8, ip_adapter_image=ip_image(), **RUN))
    finally:
        ours.unload_ip_adapter()
    assert report(f"IP-Adapter + ControlNet vs StableDiffusionControlNetPipeline (rel, latents) [{backend_name}]",
                  rel_error(got, want)) < TOL


@pytest.mark.slow
def test_inpainting_ip_adapter_matches_diffusers(sd1_inpaint, pipelines, backend_name, tmp_path):
    """9-channel inpainting with an image prompt vs StableDiffusionInpaintPipeline.load_ip_adapter."""
    from diffusers import StableDiffusionInpaintPipeline
    from test_parity_image_pipelines import make_image, make_mask, run_diffusers

    from mlx_stablefused import InpaintDiffusion

    pipe, root = sd1_inpaint
    build_ip_adapter(tmp_path, pipe.unet)
    ref = StableDiffusionInpaintPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=copy.deepcopy(pipe.unet), scheduler=trailing_ddim(pipe.scheduler.config),
                                         safety_checker=None, feature_extractor=None, image_encoder=None,
                                         requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), **WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    noise, image, mask = latents(), make_image(SIZE, SIZE), make_mask(SIZE, SIZE)
    want = run_diffusers(ref, noise, image=image, mask_image=mask, height=SIZE, width=SIZE, strength=1.0,
                         ip_adapter_image=ip_image(), prompt=RUN["prompt"], negative_prompt=RUN["negative_prompt"],
                         num_inference_steps=3, guidance_scale=7.5)
    ours = pipelines.pipeline(InpaintDiffusion, root, backend_name)
    ours.set_scheduler("ddim", timestep_spacing="trailing")
    try:
        ours.load_ip_adapter(str(tmp_path), **WEIGHTS)
        ours.set_ip_adapter_scale(SCALE)
        got = ours(RUN["prompt"], image, mask, negative_prompt=RUN["negative_prompt"], num_inference_steps=3,
                   guidance_scale=7.5, strength=1.0, noise=noise, output_type="np", ip_adapter_image=ip_image())
    finally:
        ours.unload_ip_adapter()
    assert report(f"9-channel inpainting IP-Adapter vs StableDiffusionInpaintPipeline (max abs) [{backend_name}]",
                  float(np.abs(got - want).max())) < 5e-3


# The real encoders' widths (ViT-H/14: SD 1.5's; ViT-bigG/14: SDXL's) at 224 pixels, two of their layers each.
FULL_WIDTH = {"vit-h": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, projection_dim=1024),
              "vit-bigG": dict(hidden_size=1664, intermediate_size=8192, num_attention_heads=16, projection_dim=1280)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_WIDTH))
def test_full_width_image_encoders_match_transformers(name, backend_name, tmp_path):
    """ViT-H/14 and ViT-bigG/14 widths (257 tokens, heads of 80 / 104, patch 14) vs transformers."""
    from transformers import CLIPVisionModelWithProjection

    from mlx_stablefused.clip_image_processing import clip_pixels
    from mlx_stablefused.model_description import IMAGE_ENCODER
    from mlx_stablefused.model_loading import load_network

    config = dict(FULL_WIDTH[name], num_hidden_layers=2, image_size=224, patch_size=14)
    folder = build_image_encoder(tmp_path / name, **config)
    pixels = clip_pixels([ip_image(5, (300, 200))], 224)
    ref = CLIPVisionModelWithProjection.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(pixels), output_hidden_states=True)
    if backend_name == "mlx":
        import mlx.core as mx

        from mlx_stablefused.backends.mlx.loading import NETWORKS

        out = load_network(folder, "image_encoder", NETWORKS, description=IMAGE_ENCODER)(
            mx.array(pixels.transpose(0, 2, 3, 1)), output_hidden_states=True)
        embeds, hidden = np.array(out.image_embeds), np.array(out.hidden_states[-2])
    else:
        from mlx_stablefused.backends.torch.loading import TorchNetworks

        with torch.no_grad():
            out = load_network(folder, "image_encoder", TorchNetworks(), description=IMAGE_ENCODER)(
                torch.from_numpy(pixels), output_hidden_states=True)
        embeds, hidden = out.image_embeds.numpy(), out.hidden_states[-2].numpy()
    assert report(f"{name} image encoder vs transformers (rel) [{backend_name}]",
                  rel_error(embeds, want.image_embeds.numpy())) < 1e-4
    assert rel_error(hidden, want.hidden_states[-2].numpy()) < 1e-4


@pytest.mark.slow
def test_two_images_for_one_adapter_match_diffusers(sd1, adapter_root, pipelines, backend_name):
    """diffusers' nested form ``[[image_1, image_2]]``: both images' tokens side by side for the one adapter,
    with two prompts and two images per prompt (the tokens repeated over the batch)."""
    from diffusers import StableDiffusionPipeline

    pipe, root = sd1
    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=copy.deepcopy(pipe.unet), scheduler=trailing_ddim(pipe.scheduler.config),
                                  safety_checker=None, feature_extractor=None, image_encoder=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(adapter_root), **WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    images = [[ip_image(1), ip_image(2, (40, 72))]]
    noise = np.random.default_rng(8).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    with torch.no_grad():
        want = ref(latents=torch.from_numpy(noise), height=SIZE, width=SIZE, output_type="latent",
                   ip_adapter_image=images, **RUN).images.numpy()
    ours = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    ours.set_scheduler("ddim", timestep_spacing="trailing")
    try:
        ours.load_ip_adapter(str(adapter_root), **WEIGHTS)
        ours.set_ip_adapter_scale(SCALE)
        got = as_numpy(ours(latent=noise, output_type="latent", ip_adapter_image=images, **RUN))
        batch = as_numpy(ours(latent=np.concatenate([noise] * 4), output_type="latent", ip_adapter_image=images,
                              **{**RUN, "prompt": [RUN["prompt"]] * 2, "negative_prompt": [RUN["negative_prompt"]] * 2},
                              num_images_per_prompt=2))
    finally:
        ours.unload_ip_adapter()
    assert report(f"IP-Adapter, two images for one adapter, vs diffusers (rel, latents) [{backend_name}]",
                  rel_error(got, want)) < TOL
    assert all(rel_error(batch[i:i + 1], got) < 1e-5 for i in range(4))
