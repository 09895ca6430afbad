"""ControlNet against diffusers on tiny random models: the ControlNetModel itself, and the text-to-image,
image-to-image, inpainting, SDXL and AnimateDiff ControlNet pipelines (one ControlNet; two with two scales and a
guidance window; guess mode), the original single-file layout (checked with diffusers' own from_single_file),
the canny helper against cv2.Canny, and the bad inputs refused before any work.

Each diffusers reference is computed once per module and compared against both backends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BACKENDS, NetworkRunner, max_abs_error, rel_error, report
from test_parity_image_pipelines import make_image, make_mask, run_diffusers
from tiny_controlnets import build_controlnet, control_image, to_original_format

from mlx_stablefused import (ImageToImageDiffusion, InpaintDiffusion, LatentWalkDiffusion, TextToImageDiffusion,
                             TextToVideoDiffusion)
from mlx_stablefused.conditioning import Conditioning
from mlx_stablefused.controlnets import load_controlnet
from mlx_stablefused.errors import UnsupportedModelError

TOL = 5e-3  # images on [0, 1], as every pipeline parity check
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def controlnets(sd1, sdxl, tmp_path_factory):
    """name -> (diffusers ControlNetModel, its saved folder): two for SD1 (the plain and the inpainting model
    share the UNet encoder layout), one for SDXL (text_time added conditioning)."""
    out = {}
    for name, unet, seed in (("sd1-a", sd1[0].unet, 21), ("sd1-b", sd1[0].unet, 22), ("sdxl", sdxl[0].unet, 23)):
        net = build_controlnet(unet, seed)
        folder = tmp_path_factory.mktemp(f"controlnet-{name}")
        net.save_pretrained(str(folder), safe_serialization=True)
        out[name] = net, folder
    return out


_LOADED: dict = {}


def with_controlnets(pipe, controlnets, names):
    """``pipe`` with the named ControlNets (each loaded once per backend, then shared as a ControlNet object)."""
    loaded = []
    for name in names:
        key = (id(pipe.backend), name)
        if key not in _LOADED:
            _LOADED[key] = load_controlnet(pipe.backend, controlnets[name][1])
        loaded.append(_LOADED[key])
    pipe.set_controlnet(loaded if len(loaded) > 1 else loaded[0])
    return pipe


def reference_pipeline(cls_name, base, nets, **extra):
    import diffusers

    cls = getattr(diffusers, cls_name)
    expected, optional = cls._get_signature_keys(cls)
    parts = {k: v for k, v in base.components.items() if k in expected}
    if "requires_safety_checker" in optional:
        extra["requires_safety_checker"] = False
    pipe = cls(**parts, controlnet=nets[0] if len(nets) == 1 else nets, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(key, make):
        if key not in cache:
            with torch.no_grad():
                cache[key] = make()
        return cache[key]

    return get


NOISE = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)
TWO = dict(controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.0, 0.25],
           control_guidance_end=[1.0, 0.75])
# name -> (ControlNets, keywords, steps): the window needs 4 steps to start and stop inside the schedule
T2I_CASES = {"one": (["sd1-a"], {}, 2), "two-scales-window": (["sd1-a", "sd1-b"], TWO, 4),
             "guess-mode": (["sd1-a"], dict(guess_mode=True, controlnet_conditioning_scale=0.8), 1)}


def _images(names):
    images = [control_image(seed=i + 1) for i in range(len(names))]
    return images[0] if len(images) == 1 else images


# ------------------------------------------------------------------------------------- the module
def test_controlnet_module_matches_diffusers(sd1, sdxl, controlnets, pipelines, backend_name):
    """ControlNetModel residuals vs diffusers' (odd latent size, fractional t; guess mode; SDXL's text_time)."""
    rng = np.random.default_rng(0)
    for name, root in (("sd1-a", sd1[1]), ("sdxl", sdxl[1])):
        net = controlnets[name][0]
        pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
        ours = with_controlnets(pipe, controlnets, [name]).controlnet
        x = rng.standard_normal((2, 4, 5, 7)).astype(np.float32)
        image = rng.random((2, 3, 40, 56)).astype(np.float32)
        ctx = rng.standard_normal((2, 6, net.config.cross_attention_dim)).astype(np.float32)
        added, ours_added = None, {}
        if name == "sdxl":
            pooled = rng.standard_normal((2, 40)).astype(np.float32)
            ids = np.array([[64, 80, 4, 0, 64, 64]] * 2, np.float32)
            added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}
            ours_added = dict(pooled_text=pipe.backend.from_numpy(pooled), time_ids=pipe.backend.from_numpy(ids))
        cond = Conditioning(text=pipe.backend.from_numpy(ctx), **ours_added)
        runner = NetworkRunner(pipe.backend)
        for guess in (False, True):
            with torch.no_grad():
                down, mid = net(torch.from_numpy(x), 377.5, torch.from_numpy(ctx), torch.from_numpy(image),
                                conditioning_scale=0.7, guess_mode=guess, added_cond_kwargs=added, return_dict=False)
            got_down, got_mid = pipe.backend.controlnet(ours.module, pipe.backend.latent_from_numpy(x), 377.5, cond,
                                                        runner._in(image), 0.7, guess)
            got = [runner._out(r) for r in (*got_down, got_mid)]
            worst = max(rel_error(g, w.numpy()) for g, w in zip(got, (*down, mid)))
            assert report(f"ControlNetModel residuals vs diffusers (rel) [{backend_name}]", worst) < 1e-5


# -------------------------------------------------------------------------------------- pipelines
# Default: two ControlNets with two scales and a guidance window, and guess mode, on MLX; the rest (one ControlNet
# alone, the torch runs) with -m slow: the ControlNet step is backend-neutral code, and the torch ControlNet module
# is checked by default (test_controlnet_module_matches_diffusers).
T2I_PARAMS = [pytest.param(case, backend, id=f"{backend}-{case}",
                           marks=() if backend == "mlx" and case != "one" else SLOW)
              for case in T2I_CASES for backend in BACKENDS]
@pytest.mark.parametrize("case,backend", T2I_PARAMS)
def test_text_to_image_matches_diffusers(sd1, controlnets, pipelines, references, backend, case):
    names, options, steps = T2I_CASES[case]
    run = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    want = references(("t2i", case), lambda: reference_pipeline(
        "StableDiffusionControlNetPipeline", sd1[0], [controlnets[n][0] for n in names])(
        "a cat", negative_prompt="blurry", image=_images(names), latents=torch.from_numpy(NOISE), **run, **options
    ).images)
    pipe = with_controlnets(pipelines.pipeline(TextToImageDiffusion, sd1[1], backend), controlnets, names)
    got = pipe("a cat", negative_prompt="blurry", control_image=_images(names), latent=NOISE, **run, **options)
    assert report(f"ControlNet text-to-image ({case}) vs StableDiffusionControlNetPipeline [{backend}]",
                  max_abs_error(got, want)) < TOL


@pytest.mark.parametrize("backend", [pytest.param(b, marks=SLOW) for b in BACKENDS])
def test_image_to_image_and_inpainting_match_diffusers(sd1, sd1_inpaint, controlnets, pipelines, references,
                                                       backend):
    """Image-to-image (strength 0.5, two ControlNets) and 9-channel inpainting with a ControlNet (-m slow: they add
    the same ControlStep to the recipes text-to-image checks by default)."""
    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    names = ["sd1-a", "sd1-b"]
    want = references("img2img", lambda: run_diffusers(
        reference_pipeline("StableDiffusionControlNetImg2ImgPipeline", sd1[0], [controlnets[n][0] for n in names]),
        noise, prompt="a cat", image=make_image(), control_image=_images(names), strength=0.5,
        num_inference_steps=4, guidance_scale=7.5, controlnet_conditioning_scale=[0.8, 0.5]))  # 2 steps run
    pipe = with_controlnets(pipelines.pipeline(ImageToImageDiffusion, sd1[1], backend), controlnets, names)
    got = pipe(make_image(), "a cat", control_image=_images(names), strength=0.5, num_inference_steps=4,
               noise=noise, output_type="np", controlnet_conditioning_scale=[0.8, 0.5])
    assert report(f"ControlNet image-to-image vs StableDiffusionControlNetImg2ImgPipeline [{backend}]",
                  max_abs_error(got, want)) < TOL

    image, mask, control = make_image(64, 48), make_mask(64, 48), control_image(64, 48, seed=4)
    noise = np.random.default_rng(4).standard_normal((1, 4, 6, 8)).astype(np.float32)
    want = references("inpaint", lambda: run_diffusers(
        reference_pipeline("StableDiffusionControlNetInpaintPipeline", sd1_inpaint[0], [controlnets["sd1-a"][0]]),
        noise, prompt="a cat", image=image, mask_image=mask, control_image=control, height=48, width=64,
        strength=0.5, num_inference_steps=4, guidance_scale=7.5))
    pipe = with_controlnets(pipelines.pipeline(InpaintDiffusion, sd1_inpaint[1], backend), controlnets, ["sd1-a"])
    got = pipe("a cat", image, mask, control_image=control, strength=0.5, num_inference_steps=4, noise=noise,
               output_type="np")
    assert report(f"ControlNet inpainting (9-channel) vs StableDiffusionControlNetInpaintPipeline [{backend}]",
                  max_abs_error(got, want)) < TOL


@pytest.mark.parametrize("backend", [pytest.param(b, marks=SLOW) for b in BACKENDS])
def test_sdxl_text_to_image_matches_diffusers(sdxl, controlnets, pipelines, references, backend):
    """-m slow: the SDXL ControlNet module (text_time) is checked on both backends by default, and the SDXL
    pipelines' conditioning is the same Conditioning the SD pipelines feed the ControlNet."""
    noise = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    run = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", controlnet_conditioning_scale=0.9)
    want = references("sdxl", lambda: reference_pipeline(
        "StableDiffusionXLControlNetPipeline", sdxl[0], [controlnets["sdxl"][0]], add_watermarker=False)(
        "a lighthouse", negative_prompt="blurry", image=control_image(seed=5), latents=torch.from_numpy(noise),
        **run).images)
    pipe = with_controlnets(pipelines.pipeline(TextToImageDiffusion, sdxl[1], backend), controlnets, ["sdxl"])
    got = pipe("a lighthouse", negative_prompt="blurry", control_image=control_image(seed=5), latent=noise, **run)
    assert report(f"ControlNet SDXL text-to-image vs StableDiffusionXLControlNetPipeline [{backend}]",
                  max_abs_error(got, want)) < TOL


@pytest.mark.parametrize("backend", [pytest.param(b, marks=SLOW) for b in BACKENDS])
def test_animatediff_matches_diffusers(sd1, motion_adapters, controlnets, pipelines, references, backend):
    """One control image per frame, as AnimateDiffControlNetPipeline's conditioning_frames (-m slow, for the
    default run's time budget)."""
    import diffusers

    from mlx_stablefused import ANIMATEDIFF_DDIM

    frames = [control_image(seed=10 + i) for i in range(3)]
    latents = np.random.default_rng(9).standard_normal((1, 4, 3, 8, 8)).astype(np.float32)

    def reference():
        base = sd1[0]
        config = diffusers.DDIMScheduler.load_config(str(sd1[1]), subfolder="scheduler")
        options = {k: v for k, v in ANIMATEDIFF_DDIM.items()
                   if k in diffusers.DDIMScheduler._get_init_keys(diffusers.DDIMScheduler)}
        ref = diffusers.AnimateDiffControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            motion_adapter=motion_adapters[True][0], controlnet=controlnets["sd1-a"][0],
            scheduler=diffusers.DDIMScheduler.from_config(config, **options))
        ref.set_progress_bar_config(disable=True)
        return ref(prompt="a cat walking", negative_prompt="blurry", num_frames=3, height=64, width=64,
                   conditioning_frames=frames, num_inference_steps=2, guidance_scale=7.5,
                   latents=torch.from_numpy(latents), output_type="np", controlnet_conditioning_scale=0.9).frames

    want = np.asarray(references("animatediff", reference))
    video = pipelines.pipeline(TextToVideoDiffusion, sd1[1], backend, motion_adapter=motion_adapters[True][1])
    with_controlnets(video, controlnets, ["sd1-a"])
    got = video("a cat walking", negative_prompt="blurry", latent=latents, num_inference_steps=2, guidance_scale=7.5,
                output_type="np", control_image=frames, controlnet_conditioning_scale=0.9)
    assert got.shape == want.shape == (1, 3, 64, 64, 3)
    assert report(f"ControlNet AnimateDiff vs AnimateDiffControlNetPipeline [{backend}]",
                  max_abs_error(got, want)) < TOL


# ----------------------------------------------------------------------------------- single files
def test_original_single_file_matches_the_folder(sd1, controlnets, pipelines, tmp_path):
    """lllyasviel's control_model.* layout (.safetensors and .pth): diffusers' from_single_file reads our test
    file back to the folder's tensors; ours loads the folder's parameters from it, with config= the folder, and
    with the config inferred from the tensor shapes (a ControlNet with LDM's conventions: 32 GroupNorm groups,
    8 heads)."""
    from diffusers import ControlNetModel
    from mlx.utils import tree_flatten
    from safetensors.torch import save_file

    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], "mlx")
    ldm_style = build_controlnet(sd1[0].unet, 24, norm_num_groups=32, block_out_channels=(32, 64, 64),
                                 attention_head_dim=8, layers_per_block=1)
    ldm_folder = tmp_path / "ldm-style"
    ldm_style.save_pretrained(str(ldm_folder), safe_serialization=True)
    for net, folder, config in ((controlnets["sd1-a"][0], controlnets["sd1-a"][1], True), (ldm_style, ldm_folder, False)):
        state = to_original_format(net.state_dict(), net.config.layers_per_block, 4)
        st, pth = tmp_path / f"{folder.name}.safetensors", tmp_path / f"{folder.name}.pth"
        save_file({k: v.contiguous() for k, v in state.items()}, str(st))
        torch.save(state, str(pth))
        theirs = ControlNetModel.from_single_file(str(st), config=str(folder)).state_dict()
        assert theirs.keys() == net.state_dict().keys()
        assert all(torch.equal(theirs[k], v) for k, v in net.state_dict().items())
        want_config, want = _read(pipe.backend, folder)
        b = dict(tree_flatten(want.parameters()))
        for spec in (st, pth):
            got_config, got = _read(pipe.backend, spec, config=folder if config else None)
            assert got_config == want_config
            a = dict(tree_flatten(got.parameters()))
            assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _read(backend, spec, **options):
    """A ControlNet's parsed config and module, loaded without the fit check (the LDM-style one fits no tiny model)."""
    from mlx_stablefused.config import ControlNetConfig, read_json
    from mlx_stablefused.controlnets import resolve_controlnet
    from mlx_stablefused.model_description import CONTROLNET

    source = resolve_controlnet(spec, **options)
    config_file = source.files.config if source.files is not None else source.root / "config.json"
    return (ControlNetConfig.from_dict(read_json(config_file)),
            backend.load_network(source.root, "controlnet", CONTROLNET, files=source.files))


# ------------------------------------------------------------------------------------- canny, errors
def test_canny_image_equals_cv2():
    from mlx_stablefused.control_maps import _opencv, canny_image

    cv2 = _opencv()
    image = make_image(64, 48, seed=3)
    edges = canny_image(image, 50, 150)
    want = cv2.Canny(np.asarray(image.convert("RGB")), 50, 150)
    assert edges.size == image.size and edges.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(edges), np.repeat(want[..., None], 3, axis=2))
    assert want.any() and not want.all()


def test_bad_controlnet_inputs_are_refused(sd1, sdxl, controlnets, pipelines):
    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1])
    with pytest.raises(UnsupportedModelError, match="cross_attention_dim"):
        pipe.set_controlnet(controlnets["sdxl"][1])  # an SDXL ControlNet on an SD 1.x model
    with pytest.raises(UnsupportedModelError, match="channels"):
        load_controlnet(pipe.backend, _wider(controlnets, "sd1-a"))
    with pytest.raises(ValueError, match="no ControlNet is loaded"):
        pipe("a", control_image=control_image(), num_inference_steps=1)
    with pytest.raises(ValueError, match="LatentWalkDiffusion takes no ControlNet"):
        LatentWalkDiffusion(components=pipe.components, progress=False, controlnet=controlnets["sd1-a"][1])
    with_controlnets(pipe, controlnets, ["sd1-a", "sd1-b"])
    args = dict(num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="pass control_image"):
        pipe("a", **args)
    with pytest.raises(ValueError, match="3 control images for 2 ControlNets"):
        pipe("a", control_image=[control_image()] * 3, **args)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 entries for 2 ControlNets"):
        pipe("a", control_image=_images(["a", "b"]), controlnet_conditioning_scale=[1, 1, 1], **args)
    with pytest.raises(ValueError, match="control_guidance_start=0.5 must be below control_guidance_end=0.5"):
        pipe("a", control_image=_images(["a", "b"]), control_guidance_start=0.5, control_guidance_end=0.5, **args)
    with pytest.raises(ValueError, match=r"control_image\[1\] is 48x64 but the output is 64x64"):
        pipe("a", control_image=[control_image(), control_image(48, 64)], **args)
    with_controlnets(pipe, controlnets, ["sd1-a"])
    with pytest.raises(ValueError, match="2 images for 1 prompt"):
        pipe("a", control_image=[control_image(), control_image()], **args)
    sizes = pipe("a", control_image=control_image(48, 32), **args).shape  # the control image's size by default
    assert tuple(sizes) == (1, 4, 4, 6)
    embedding = pipe.prompt_to_embedding("a")
    with pytest.raises(ValueError, match="takes no control_image"):  # not run without the ControlNet
        pipe.sample_from_noise(embedding, np.zeros((1, 4, 8, 8), np.float32), 1, 7.5, 0.0, np.random.default_rng(0))


def _wider(controlnets, name):
    """A copy of a ControlNet folder whose config asks for other block widths (the residuals do not fit)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    src = controlnets[name][1]
    dst = Path(tempfile.mkdtemp()) / "wider"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["block_out_channels"] = [c * 2 for c in config["block_out_channels"]]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------------------------ command line
def test_command_line_controlnet_on_the_demo_model(tmp_path, capsys):
    """--controlnet / --control-image / --controlnet-scale give the API's image (the size: the control image's);
    count mismatches are refused by flag before any model loads."""
    from PIL import Image

    from mlx_stablefused.cli import main

    edges = tmp_path / "edges.png"
    control_image(64, 48, seed=3).save(edges)
    out = tmp_path / "out.png"
    fast = ["--model", "demo:tiny-random", "--steps", "2", "--no-progress", "--seed", "1"]
    assert main(["txt2img", "--prompt", "a house", "--output", str(out), *fast, "--controlnet", "demo:controlnet",
                 "--control-image", str(edges), "--controlnet-scale", "0.7"]) == 0
    pipe = TextToImageDiffusion("demo:tiny-random", controlnet="demo:controlnet", progress=False)
    want = pipe("a house", control_image=str(edges), controlnet_conditioning_scale=0.7, num_inference_steps=2,
                seed=1)[0]
    assert Image.open(out).size == (64, 48)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
    capsys.readouterr()
    for extra, message in ((["--controlnet", "demo:controlnet"], "--control-image: each --controlnet needs"),
                           (["--controlnet", "demo:controlnet", "--control-image", str(edges), "--control-image",
                             str(edges)], "--control-image: given 2 times for 1 --controlnet"),
                           (["--guess-mode"], "need --controlnet")):
        assert main(["txt2img", "--prompt", "x", "--output", str(tmp_path / "x.png"), *fast, *extra]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_hub_id_downloads_the_config_and_one_weight_file(controlnets, monkeypatch):
    """A hub id goes through sources' download: only config.json and the best weight file (the variant's)."""
    import huggingface_hub

    import mlx_stablefused.hub_access as hub_access
    from mlx_stablefused.controlnets import resolve_controlnet

    folder = controlnets["sd1-a"][1]
    asked = {}

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            return ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                    "diffusion_pytorch_model.fp16.safetensors", "README.md", "images/example.png"]

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        asked.update(repo=repo_id, patterns=list(allow_patterns))
        return str(folder)

    monkeypatch.setattr(hub_access, "offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = resolve_controlnet("lllyasviel/control_v11p_sd15_canny", variant="fp16")
    assert source.root == folder and asked["repo"] == "lllyasviel/control_v11p_sd15_canny"
    wanted = [p for p in asked["patterns"] if p not in ("mlx_manifest.json", "*/weights.safetensors")]
    assert "config.json" in wanted and "diffusion_pytorch_model.fp16.safetensors" in wanted
    assert not {"diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors", "README.md"} & set(wanted)
