"""LoRA: our images against diffusers' ``load_lora_weights`` (with PEFT) on the tiny SD1 model, per format.

The LoRA files are made here (tests/lora_files.py): a PEFT LoRA on the UNet (attention, feed-forward,
1x1 and 3x3 convolutions, time embedding) and the text encoder, saved with diffusers' ``save_lora_weights``;
the same matrices in kohya's naming (its 3x3 convolutions make it a LyCORIS LoCon file), and in diffusers'
old attention-processor naming. diffusers itself loads the kohya file and gives the PEFT file's images.
"""

import copy
import logging
import warnings

import numpy as np
import pytest
import torch
from helpers import diffusers_scheduler, max_abs_error, report
from lora_files import (LORA_A, LORA_B, make_motion_lora, make_peft_lora, peft_for_transformers, to_kohya,
                        to_old_diffusers, to_original_motion_lora)

from mlx_stablefused import ANIMATEDIFF_DDIM, ImageToImageDiffusion, TextToImageDiffusion, TextToVideoDiffusion
from mlx_stablefused import LoRAError

RUN = dict(prompt="a photo of the cat", negative_prompt="blurry", num_inference_steps=1, guidance_scale=7.5)
SIZE = 32
SAMPLER = dict(timestep_spacing="trailing")  # one DDIM step from t = 999: the UNet's prediction is the image
SCALES = (0.0, 0.5, 1.0)
TWO = (["a", "b"], [0.7, 0.4])  # two adapters at once, with weights
TOL = 5e-3  # the parity table's tolerance for images in [0, 1]


def ddim(root):
    import diffusers

    config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
    return diffusers_scheduler("ddim", dict(config), **SAMPLER)


def with_sampler(pipe):
    pipe.set_scheduler("ddim", **SAMPLER)
    return pipe


def latents():
    return np.random.default_rng(3).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


@pytest.fixture(scope="module")
def lora_files(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    pipe = sd1[0]
    files = {"a": make_peft_lora(pipe, LORA_A, folder / "a"), "b": make_peft_lora(pipe, LORA_B, folder / "b")}
    files["a_kohya"] = to_kohya(files["a"], LORA_A.alpha, folder / "a_kohya.safetensors")
    files["a_ldm"] = to_kohya(files["a"], LORA_A.alpha, folder / "a_ldm.safetensors", ldm=True)
    files["a_old"] = to_old_diffusers(files["a"], folder / "a_old.safetensors")
    return files


@pytest.fixture(scope="module")
def reference(sd1, lora_files):
    """diffusers' images: LoRA a at each scale, a and b weighted, and a from the kohya file."""
    pipe, root = sd1
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=copy.deepcopy(pipe.text_encoder), tokenizer=pipe.tokenizer,
                                  unet=copy.deepcopy(pipe.unet), scheduler=ddim(root),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)

    def image():
        with torch.no_grad():
            return ref(latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="np", **RUN).images

    out = {}
    with peft_for_transformers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`")  # a second adapter, as intended
        ref.load_lora_weights(str(lora_files["a"].parent), adapter_name="a")
        for s in SCALES:
            ref.set_adapters(["a"], [s])
            out[("a", s)] = image()
        ref.load_lora_weights(str(lora_files["b"].parent), adapter_name="b")
        ref.set_adapters(*TWO)
        out["a+b"] = image()
        ref.delete_adapters(["a", "b"])
        ref.load_lora_weights(str(lora_files["a_kohya"]), adapter_name="a_kohya")
        ref.set_adapters(["a_kohya"], [1.0])
        out["a_kohya"] = image()

    return out


def test_diffusers_reads_our_kohya_encoding_as_the_peft_file(sd1, reference, lora_files):
    """The test helper's kohya encoding is right: diffusers' own converter gives the PEFT file's images."""
    from safetensors import safe_open

    with safe_open(str(lora_files["a_kohya"]), "np") as f:
        downs = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("lora_down.weight")}
    assert any(len(s) == 4 and s[2:] == [3, 3] for s in downs.values())  # LoCon: 3x3 down, 1x1 up
    assert max_abs_error(reference["a_kohya"], reference[("a", 1.0)]) < 1e-5

    # LDM block names: diffusers' converters (its SD 1.x loader skips the block mapper) give the kohya file's state.
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from safetensors.torch import load_file

    ldm = _maybe_map_sgm_blocks_to_diffusers(load_file(str(lora_files["a_ldm"])), sd1[0].unet.config)
    (ldm, ldm_alphas), (kohya, alphas) = (_convert_non_diffusers_lora_to_diffusers(state) for state in
                                          (ldm, load_file(str(lora_files["a_kohya"]))))
    assert ldm_alphas == alphas and set(ldm) == set(kohya) and all(torch.equal(ldm[k], kohya[k]) for k in kohya)
    assert max_abs_error(reference[("a", 1.0)], reference[("a", 0.0)]) > 0.05  # the LoRA changes the image


def layers(path):
    """The layers a PEFT file patches."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k.removesuffix(".lora_A.weight") for k in f.keys() if k.endswith(".lora_A.weight")}


def parameters(backend):
    """Every UNet and text-encoder weight as numpy (to check that unfusing restores them bit for bit)."""
    out = {}
    for name in ("unet", "text_encoder"):
        module = backend.components[name]
        if backend.name == "mlx":
            from mlx.utils import tree_flatten

            items = tree_flatten(module.parameters())
        else:
            items = module.state_dict().items()
        out.update({f"{name}.{k}": np.array(v) for k, v in items})
    return out


def test_lora_images_match_diffusers(sd1, backend_name, pipelines, lora_files, reference, caplog):
    """PEFT file at scales 0, 0.5, 1 and two weighted adapters vs diffusers; fused equals unfused and
    unfusing restores every weight exactly; the kohya (LoCon; diffusers' and LDM block names) and
    old-diffusers encodings give the PEFT file's images; unloading gives the plain model back. Adapters are
    shared by from_pipeline pipelines."""
    pipe = with_sampler(pipelines.pipeline(TextToImageDiffusion, sd1[1], backend_name))

    def image():
        return pipe(latent=latents(), image_height=SIZE, image_width=SIZE, output_type="np", seed=0, **RUN)

    images = {}
    try:
        with caplog.at_level(logging.INFO, logger="mlx_stablefused.lora"):
            assert pipe.load_lora_weights(lora_files["a"].parent, adapter_name="a") == "a"
        assert f"patched {len(layers(lora_files['a']))} layers" in caplog.text
        assert ImageToImageDiffusion.from_pipeline(pipe).get_active_adapters() == ["a"]
        for s in SCALES:
            pipe.set_adapters(["a"], [s])
            images[s] = ours = image()
            err = report(f"LoRA (PEFT) at scale {s} vs diffusers (max abs)", max_abs_error(ours, reference[("a", s)]))
            assert err < TOL, s
        plain = images[0.0]  # weight 0 adds exact zeros: the plain model's image
        assert max_abs_error(ours, plain) > 0.05
        pipe.load_lora_weights(lora_files["b"].parent, adapter_name="b")
        assert pipe.get_active_adapters() == ["b"]  # as diffusers: the adapter just loaded
        pipe.set_adapters(*TWO)
        unfused = image()
        assert report("two LoRAs with weights vs diffusers (max abs)", max_abs_error(unfused, reference["a+b"])) < TOL

        before = parameters(pipe.backend)
        assert pipe.fuse_lora() == len(layers(lora_files["a"]) | layers(lora_files["b"]))
        fused = image()
        assert report("fused vs unfused LoRA (max abs)", max_abs_error(fused, unfused)) < 1e-4
        assert max_abs_error(fused, plain) > 0.05
        pipe.unfuse_lora()
        after = parameters(pipe.backend)
        assert all(np.array_equal(after[k], v) for k, v in before.items())

        pipe.delete_adapters(["a", "b"])
        pipe.load_lora_weights(lora_files["a_kohya"], adapter_name="a_kohya")
        kohya = image()
        assert report("kohya / LoCon LoRA vs diffusers (max abs)", max_abs_error(kohya, reference["a_kohya"])) < TOL
        assert report("kohya vs PEFT encoding, ours (max abs)", max_abs_error(kohya, ours)) < 1e-5  # same matrices
        pipe.delete_adapters("a_kohya")
        pipe.load_lora_weights(lora_files["a_ldm"], adapter_name="a_ldm")
        assert report("kohya LDM block names vs PEFT encoding, ours (max abs)", max_abs_error(image(), ours)) < 1e-5
        pipe.delete_adapters("a_ldm")
        pipe.load_lora_weights(lora_files["a_old"], adapter_name="a_old")
        pipe.set_adapters("a_old", 2.0)  # the old format has no alpha: scale 1 instead of 8 / 4
        assert report("old diffusers vs PEFT encoding, ours (max abs)", max_abs_error(image(), ours)) < 1e-5
    finally:
        pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    np.testing.assert_array_equal(image(), plain)


def test_lora_on_an_8bit_quantized_model(sd1, lora_files):
    """MLX: the LoRA runs unfused on QuantizedLinear layers (and survives quantize()); fusing is refused."""
    pipe = with_sampler(TextToImageDiffusion(sd1[1], progress=False))

    def image():
        return pipe(latent=latents(), image_height=SIZE, image_width=SIZE, output_type="np", seed=0, **RUN)

    pipe.load_lora_weights(lora_files["a"], adapter_name="a")
    unquantized = image()
    pipe.quantize(bits=8, group_size=32, components=("unet", "text_encoder"))
    with_lora = image()
    err = max_abs_error(with_lora, unquantized)
    assert report("8-bit quantized model with a LoRA vs fp32 with it (max abs)", err) < 0.05
    pipe.disable_lora()
    assert max_abs_error(image(), with_lora) > 0.05
    pipe.enable_lora()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_files["a"], adapter_name="a")  # onto the quantized layers this time
    np.testing.assert_array_equal(image(), with_lora)
    with pytest.raises(RuntimeError, match="quantized"):
        pipe.fuse_lora()


def write(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_a_lora_for_another_model_is_named(sd1, backend_name, pipelines, lora_files, tmp_path):
    """Unmatched keys, wrong shapes, missing networks and unsupported kinds are refused by name, and
    nothing is attached."""
    from safetensors.numpy import load_file

    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], backend_name)
    good = load_file(str(lora_files["a_kohya"]))
    cases = {
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight":
            {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": np.ones((4, 16)),
             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": np.ones((16, 4))},
        r"does not fit .*weight 16 x 16.* down \(4, 320\)":  # SD 1.5's width on the tiny model
            {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": np.ones((4, 320)),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": np.ones((320, 4))},
        r"text_encoder_2.*lora_te2_text_model":
            {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((4, 32)),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.ones((64, 4))},
        "LoHa": {"lora_unet_conv_in.hada_w1_a": np.ones((4, 4))},
    }
    for i, (message, extra) in enumerate(cases.items()):
        path = write(tmp_path / f"bad{i}.safetensors", {**good, **extra})
        with pytest.raises(LoRAError, match=message) as info:
            pipe.load_lora_weights(path)
        assert str(path) in str(info.value)
        assert "LoHa" in message or str(sd1[1]) in str(info.value)  # the file and the model it does not fit
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []


@pytest.fixture(scope="module")
def motion_lora(sd1, motion_adapters, tmp_path_factory):
    """A MotionLoRA for the tiny motion UNet (diffusers format and the original AnimateDiff naming) and
    diffusers' AnimateDiffPipeline video with it loaded by load_lora_weights."""
    import diffusers

    pipe, root = sd1
    folder = tmp_path_factory.mktemp("motion-lora")
    config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
    ref = diffusers.AnimateDiffPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                        unet=copy.deepcopy(pipe.unet), motion_adapter=motion_adapters[True][0],
                                        scheduler=diffusers.DDIMScheduler.from_config(config, **VIDEO_SAMPLER))
    ref.set_progress_bar_config(disable=True)
    peft_file = make_motion_lora(ref.unet, folder / "diffusers")
    original = to_original_motion_lora(peft_file, folder / "v2_lora_Tiny.ckpt")
    ref.load_lora_weights(str(peft_file), adapter_name="motion")
    with torch.no_grad():
        video = ref(latents=torch.from_numpy(video_latents()), output_type="np", **VIDEO_RUN).frames
    return peft_file, original, np.asarray(video)


VIDEO_SAMPLER = {**ANIMATEDIFF_DDIM, "timestep_spacing": "trailing"}
VIDEO_RUN = dict(prompt="a cat walking", negative_prompt="blurry", num_inference_steps=1, guidance_scale=7.5,
                 height=SIZE, width=SIZE, num_frames=3)


def video_latents():
    return np.random.default_rng(4).standard_normal((1, 4, 3, SIZE // 8, SIZE // 8)).astype(np.float32)


def test_motion_lora_matches_animatediff_pipeline(sd1, motion_adapters, pipelines, backend_name, motion_lora):
    """An AnimateDiff MotionLoRA patches the motion modules: diffusers' format and the original repo's .ckpt
    naming give AnimateDiffPipeline's video."""
    peft_file, original, expected = motion_lora
    video = pipelines.pipeline(TextToVideoDiffusion, sd1[1], backend_name, motion_adapter=motion_adapters[True][1])
    video.set_scheduler("ddim", **VIDEO_SAMPLER)
    args = {k: v for k, v in VIDEO_RUN.items() if k not in ("height", "width", "num_frames")}

    def frames():
        return video(latent=video_latents(), video_height=SIZE, video_width=SIZE, output_type="np", **args)

    try:
        video.load_lora_weights(peft_file, adapter_name="motion")
        assert set(video.get_list_adapters()) == {"unet"}
        got = frames()
        assert report("MotionLoRA vs AnimateDiffPipeline (max abs)", max_abs_error(got, expected)) < TOL
        video.delete_adapters("motion")
        assert max_abs_error(frames(), got) > 0.05  # the LoRA mattered
        video.load_lora_weights(original, adapter_name="original")
        assert report("original vs diffusers MotionLoRA naming (max abs)", max_abs_error(frames(), got)) < 1e-5
    finally:
        video.unload_lora_weights()


def test_ldm_block_names_of_the_sd15_unet():
    """kohya's LDM block names on the full SD 1.5 layout, samplers included, as the original checkpoint names
    those layers (``model.diffusion_model.input_blocks.3.0.op`` ...)."""
    from mlx_stablefused.backends.mlx.lora import MLXLoRAHost
    from mlx_stablefused.backends.mlx.unet import UNet2DConditionModel
    from mlx_stablefused.config import UNetConfig
    from mlx_stablefused.lora import ldm_unet_names

    class Networks:  # the full SD 1.5 UNet, never evaluated (MLX arrays are lazy)
        components = {"unet": UNet2DConditionModel(UNetConfig())}

    names = ldm_unet_names(MLXLoRAHost(Networks).lora_targets()["unet"])
    facts = {"conv_in": "input_blocks.0.0", "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
             "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
             "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
             "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
             "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
             "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
             "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",  # no attention in up block 0
             "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
             "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
             "up_blocks.3.resnets.2.conv1": "output_blocks.11.0.in_layers.2", "conv_out": "out.2",
             "time_embedding.linear_2": "time_embed.2"}
    assert {k: names[k] for k in facts} == facts
    assert len(set(names.values())) == len(names)  # one LDM name per layer


def test_bf16_and_pickle_files_and_api_rules(sd1, pipelines, lora_files, tmp_path):
    """A bfloat16 .safetensors and a .ckpt read as torch reads them; adapter names, weights and fusing are
    checked before anything changes."""
    from safetensors.torch import load_file, save_file

    from mlx_stablefused.lora import read_lora_tensors

    state = load_file(str(lora_files["a_kohya"]))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))
    torch.save({k: v.to(torch.float16) for k, v in state.items()}, str(tmp_path / "fp16.ckpt"))
    for name, dtype in (("bf16.safetensors", torch.bfloat16), ("fp16.ckpt", torch.float16)):
        tensors, _ = read_lora_tensors(tmp_path / name)
        assert set(tensors) == set(state)
        assert all(np.array_equal(tensors[k], state[k].to(dtype).float().numpy()) for k in state)

    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1])
    try:
        with pytest.raises(ValueError, match="no active LoRA adapter"):
            pipe.fuse_lora()
        assert pipe.load_lora_weights(tmp_path / "bf16.safetensors") == "default_0"
        with pytest.raises(ValueError, match="already loaded"):
            pipe.load_lora_weights(tmp_path / "bf16.safetensors", adapter_name="default_0")
        with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
            pipe.set_adapters(["default_0", "nope"], [1.0, 1.0])
        with pytest.raises(ValueError, match="2 adapter names but 1 weights"):
            pipe.set_adapters(["default_0", "default_0"], [1.0])
        with pytest.raises(ValueError, match="finite"):
            pipe.set_adapters("default_0", float("nan"))
        assert pipe.get_active_adapters() == ["default_0"]
        pipe.fuse_lora()
        with pytest.raises(RuntimeError, match="unfuse_lora"):
            pipe.set_adapters("default_0", 0.5)
        pipe.unfuse_lora()
    finally:
        pipe.unload_lora_weights()


def test_lora_tags_in_prompts_load_and_weight_real_lora_files(sd1, pipelines, lora_files, reference, tmp_path):
    """``<lora:name:w>`` (A1111 syntax, a LoRA folder) gives diffusers' image at that weight; a prompt
    without the tag gives the plain model's image again."""
    import shutil

    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copy(lora_files["a_kohya"], folder / "styles" / "inkStyle.safetensors")
    pipe = with_sampler(pipelines.pipeline(TextToImageDiffusion, sd1[1], "mlx"))
    pipe.enable_prompt_weighting(lora_dir=folder)

    def image(prompt):
        return pipe(**{**RUN, "prompt": prompt}, latent=latents(), image_height=SIZE, image_width=SIZE,
                    output_type="np", seed=0)

    try:
        tagged = image(RUN["prompt"] + " <lora:inkStyle:0.5>")
        assert report("<lora:...:0.5> tag vs diffusers at scale 0.5 (max abs)",
                      max_abs_error(tagged, reference[("a", 0.5)])) < TOL
        assert max_abs_error(image(RUN["prompt"]), reference[("a", 0.0)]) < TOL  # the tag gone: weight 0
    finally:
        pipe.unload_lora_weights()


def test_sdxl_lora_on_the_unet_and_both_text_encoders(sdxl, lora_files, tmp_path):
    """A PEFT LoRA on the SDXL UNet and both text encoders, saved with StableDiffusionXLPipeline's
    save_lora_weights, and the same in kohya's SDXL naming, give diffusers' images (MLX); the tiny SD 1
    model's LoRA is refused naming the text-state widths."""
    import diffusers
    from lora_files import _randomize_lora
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    session, root = sdxl
    saved, metadata, modules = {}, {}, {}
    for component, targets in (("unet", LORA_A.unet_targets), ("text_encoder", LORA_A.text_targets),
                               ("text_encoder_2", LORA_A.text_targets)):
        modules[component] = copy.deepcopy(getattr(session, component))
        probe = copy.deepcopy(modules[component])
        config = LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets), init_lora_weights=False)
        inject_adapter_in_model(config, probe, adapter_name="x")
        _randomize_lora(probe, 5 + len(component))
        saved[component], metadata[component] = get_peft_model_state_dict(probe, adapter_name="x"), config.to_dict()
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=saved["unet"], text_encoder_lora_layers=saved["text_encoder"],
        text_encoder_2_lora_layers=saved["text_encoder_2"], unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"], safe_serialization=True)
    ref = diffusers.StableDiffusionXLPipeline(**{**session.components, **modules, "scheduler": ddim(root)})
    ref.set_progress_bar_config(disable=True)
    with peft_for_transformers():
        ref.load_lora_weights(str(tmp_path), adapter_name="x")
    with torch.no_grad():
        want = ref(latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="np", **RUN).images
    # The same matrices as kohya names SDXL's (LDM UNet blocks, lora_te1_ / lora_te2_): diffusers reads them
    # as the PEFT file first, then ours must give diffusers' image of the kohya file.
    kohya = to_kohya(tmp_path / "pytorch_lora_weights.safetensors", 8.0, tmp_path / "kohya_sdxl.safetensors",
                     ldm=True, sdxl=True, layers_per_block=session.unet.config.layers_per_block)
    with peft_for_transformers():
        ref.delete_adapters("x")
        ref.load_lora_weights(str(kohya), adapter_name="k")
    with torch.no_grad():
        want_kohya = ref(latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="np", **RUN).images
    assert max_abs_error(want_kohya, want) < 1e-5
    pipe = with_sampler(TextToImageDiffusion(root, backend="mlx", progress=False))
    plain = pipe(latent=latents(), image_height=SIZE, image_width=SIZE, output_type="np", **RUN)
    pipe.load_lora_weights(tmp_path / "pytorch_lora_weights.safetensors", adapter_name="x")
    got = pipe(latent=latents(), image_height=SIZE, image_width=SIZE, output_type="np", **RUN)
    assert report("SDXL LoRA (UNet + both encoders) vs diffusers (max abs)", max_abs_error(got, want)) < TOL
    assert max_abs_error(got, plain) > 0.05
    pipe.unload_lora_weights()
    pipe.load_lora_weights(kohya, adapter_name="k")
    got = pipe(latent=latents(), image_height=SIZE, image_width=SIZE, output_type="np", **RUN)
    assert report("SDXL kohya LoRA (LDM blocks, lora_te1_/lora_te2_) vs diffusers (max abs)",
                  max_abs_error(got, want_kohya)) < TOL
    pipe.unload_lora_weights()
    with pytest.raises(LoRAError, match=r"a_kohya.* LoRA for another model family: its UNet's cross-attention reads "
                                        r"32-wide text states, .*'s reads 80-wide ones"):
        pipe.load_lora_weights(lora_files["a_kohya"])  # the tiny SD 1 model's LoRA
    assert pipe.get_list_adapters() == {}
