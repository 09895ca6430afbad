"""Single-file checkpoints and VAE files: the same model as its diffusers folder, tensor for tensor and image for
image. The files are made here from the tiny diffusers models (the inverse mapping is tests/ldm_checkpoints.py,
checked against diffusers' own from_single_file first)."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import ldm_checkpoints as ldm
import numpy as np
import pytest
import torch
from helpers import unpack_clip_vocabulary

from mlx_stablefused import InpaintDiffusion, TextToImageDiffusion
from mlx_stablefused.errors import ModelSourceError, UnsupportedModelError, WeightLoadError
from mlx_stablefused.ldm_checkpoint import (OriginalConfig, checkpoint_shapes, clip_config, key_maps, mapped_shapes,
                                            plan_checkpoint, unet_config, vae_config)

ROLES = {"unet": "unet_model", "vae": "vae", "text_encoder": "text_encoder"}


def tensors(backend, component: str) -> dict[str, np.ndarray]:
    module = getattr(backend, ROLES[component])
    if backend.name == "mlx":
        from mlx.utils import tree_flatten

        return {k: np.asarray(v) for k, v in tree_flatten(module.parameters())}
    return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}


def assert_same_tensors(a, b, round_to=None) -> None:
    for component in ROLES:
        x, y = tensors(a, component), tensors(b, component)
        assert x.keys() == y.keys(), component
        if round_to is not None:
            y = {k: v.astype(round_to).astype(v.dtype) for k, v in y.items()}
        bad = [k for k in x if not np.array_equal(x[k], y[k])]
        assert not bad, f"{component}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def _mlx_networks():
    from mlx_stablefused.backends.mlx.loading import NETWORKS

    return NETWORKS


def image(pipe, **kwargs) -> np.ndarray:
    return pipe("a red boat", image_height=32, image_width=32, num_inference_steps=2, seed=3, output_type="np",
                **kwargs)


@pytest.fixture(scope="module")
def files(sd1, sd2, sd1_inpaint, tmp_path_factory):
    """Single files of the tiny fixtures: SD1 fp16 .safetensors, SD1 fp32 .ckpt with EMA copies (and the non-EMA
    weights it holds), SD2 with OpenCLIP keys, the 9-channel inpainting model."""
    root = tmp_path_factory.mktemp("single-files")
    ema_state, non_ema = ldm.ema_copies(ldm.ldm_state(sd1[0]))
    return {
        "sd1_fp16": ldm.save_single_file(ldm.ldm_state(sd1[0]), root / "sd1.safetensors", torch.float16),
        "sd1_ema": ldm.save_single_file(ema_state, root / "sd1-ema.ckpt"),
        "non_ema": non_ema,
        "sd2": ldm.save_single_file(ldm.ldm_state(sd2[0], open_clip=True), root / "sd2.safetensors"),
        "inpaint": ldm.save_single_file(ldm.ldm_state(sd1_inpaint[0]), root / "inpaint.safetensors"),
    }


def test_the_inverse_mapping_is_what_diffusers_from_single_file_reads(files, sd1, sd2):
    """The test files are real LDM files: diffusers' own converter gives back the tiny models' tensors."""
    import diffusers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel

    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(files["sd1_fp16"]), config=str(sd1[1]),
                                                             safety_checker=None, local_files_only=True)
    for name in ROLES:
        ref, got = getattr(sd1[0], name).state_dict(), getattr(pipe, name).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k].half(), got[k]) for k in ref), name
    # SD2: the OpenCLIP text encoder (diffusers' UNet converter takes one layers_per_block, the tiny SD2 has three)
    checkpoint = load_single_file_checkpoint(str(files["sd2"]), local_files_only=True)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, config=str(sd2[1]), subfolder="text_encoder",
                                                local_files_only=True)
    ref = sd2[0].text_encoder.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in text.state_dict().items() if k in ref)
    assert set(ref) - {k for k in ref if k.endswith("position_ids")} <= set(text.state_dict())


@pytest.mark.parametrize("case", ["sd1_fp16", "sd1_ema", "sd2", "inpaint"])
def test_single_file_equals_its_folder(case, files, sd1, sd2, sd1_inpaint, pipelines, tmp_path):
    """Loaded from one LDM file (config= the folder, as the tiny models' GroupNorm groups and heads are not LDM's
    conventions): identical tensors and images. fp16 file: against the folder's weights in fp16."""
    folder = {"sd1_fp16": sd1, "sd1_ema": sd1, "sd2": sd2, "inpaint": sd1_inpaint}[case][1]
    cls = InpaintDiffusion if case == "inpaint" else TextToImageDiffusion
    dtype = "float16" if case == "sd1_fp16" else "float32"
    ours = cls(str(files[case]), config=str(folder), dtype=dtype, use_ema=case == "sd1_ema", progress=False)
    ref = cls(components=pipelines.components(cls, folder, dtype=dtype), progress=False)
    assert_same_tensors(ours.backend, ref.backend)
    extra = {}
    if case == "inpaint":
        rng = np.random.default_rng(0)
        extra = dict(image=rng.random((32, 32, 3)).astype(np.float32), mask=(rng.random((32, 32)) > 0.5).astype(np.float32))
    assert np.array_equal(image(ours, **extra), image(ref, **extra))
    if case == "sd1_ema":  # by default the model.diffusion_model weights (diffusers' and A1111's choice), not EMA
        from mlx_stablefused.model_description import UNET_2D
        from mlx_stablefused.model_loading import read_component_files
        from mlx_stablefused.single_file import resolve_model_or_file

        plain = resolve_model_or_file(str(files[case]), config=str(folder)).overrides["unet"]
        got = read_component_files(_mlx_networks(),
                                   plain, UNET_2D)
        non_ema = {k[len("model.diffusion_model."):]: v.numpy() for k, v in files["non_ema"].items()}
        assert np.array_equal(np.asarray(got["conv_in.weight"]), non_ema["input_blocks.0.0.weight"])
        assert not np.array_equal(non_ema["input_blocks.0.0.weight"], sd1[0].unet.conv_in.weight.detach().numpy())


def test_single_file_on_the_torch_backend(files, sd2, pipelines):
    ours = TextToImageDiffusion(str(files["sd2"]), config=str(sd2[1]), backend="torch", progress=False)
    assert_same_tensors(ours.backend, pipelines.components(TextToImageDiffusion, sd2[1], "torch").backend)


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def test_what_the_tensors_say_is_inferred(files, sd1, sd2, sd1_inpaint):
    """Block structure, per-block layers and depths, channels, projections, widths: as the folders' configs
    (the tiny SD2 has 1, 2, 1 layers and depths per block)."""
    for case, (_, folder) in (("sd1_fp16", sd1), ("sd2", sd2), ("inpaint", sd1_inpaint)):
        shapes = checkpoint_shapes(files[case])
        plan = key_maps(shapes, case)
        assert plan.family == ("sd2" if case == "sd2" else "sd1")
        unet_shapes = mapped_shapes(shapes, plan.key_maps["unet"])
        unet = unet_config(unet_shapes, {t: t for t in unet_shapes}, plan.unet_blocks, plan.family, OriginalConfig())
        want = json.loads((folder / "unet" / "config.json").read_text())
        n = len(want["block_out_channels"])
        for key in ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
                    "cross_attention_dim", "use_linear_projection"):
            assert unet[key] == want[key], (case, key)
        assert _per_block(unet["layers_per_block"], n) == _per_block(want["layers_per_block"], n)
        attention = [t.startswith("CrossAttn") for t in want["down_block_types"]]
        depths = [_per_block(c["transformer_layers_per_block"], n) for c in (unet, want)]
        assert [d for d, a in zip(depths[0], attention) if a] == [d for d, a in zip(depths[1], attention) if a]
        for component, infer in (("vae", vae_config), ("text_encoder", clip_config)):
            inferred = infer(mapped_shapes(shapes, plan.key_maps[component]))
            expected = json.loads((folder / component / "config.json").read_text())
            assert {k: expected[k] for k in inferred} == inferred, (case, component)


# Published configs of the full-size models (stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-inpainting).
SD15 = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
            use_linear_projection=False, transformer_layers_per_block=1)
SD21 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)


def _full_size_shapes(unet_cfg: dict, text_cfg: dict, open_clip: bool) -> dict[str, tuple[int, ...]]:
    """An LDM file's tensor shapes for a full-size architecture, built on the meta device (no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **text_cfg)).state_dict()
    state = ldm.unet_to_ldm(unet.state_dict(), dict(unet.config))
    state.update(ldm.vae_to_ldm(vae.state_dict(), dict(vae.config)))
    state.update(ldm.clip_to_open_clip(text) if open_clip else ldm.clip_to_ldm(text))
    return {k: tuple(v.shape) for k, v in state.items()}


def test_full_size_architectures_are_inferred_from_the_tensors(tmp_path):
    sd15_text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu")
    sd2_text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")
    sd15 = _full_size_shapes(dict(cross_attention_dim=768), sd15_text, open_clip=False)
    sd21 = _full_size_shapes(dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
                             sd2_text, open_clip=True)
    inpaint = dict(sd15, **{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    (tmp_path / "v2-inference-v.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n"
                                                  "    unet_config:\n      params:\n        num_head_channels: 64\n")
    cases = [(sd15, SD15, sd15_text, {}, 4), (inpaint, SD15, sd15_text, {}, 9),
             (sd21, SD21, sd2_text, dict(original=OriginalConfig.read(tmp_path / "v2-inference-v.yaml")), 4)]
    for shapes, unet_want, text_want, options, in_channels in cases:
        configs = plan_checkpoint(shapes, "full-size", **options).configs
        assert {k: configs["unet"][k] for k in unet_want} == unet_want
        assert configs["unet"]["in_channels"] == in_channels
        assert {k: configs["text_encoder"][k] for k in text_want} == text_want
        assert configs["vae"]["block_out_channels"] == [128, 256, 512, 512] and configs["vae"]["layers_per_block"] == 2
    assert configs["scheduler"]["prediction_type"] == "v_prediction" and configs["unet"]["sample_size"] == 96
    assert configs["tokenizer"]["pad_token"] == "!"


# ------------------------------------------------------------------------- no config: the LDM conventions
LDM_TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
LDM_TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
LDM_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                     max_position_embeddings=77, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def ldm_tiny(tmp_path_factory):
    """A tiny SD1 that follows LDM's conventions (32 GroupNorm groups, 8 heads, 64-channel CLIP heads, CLIP's
    vocabulary): its single file needs no config=. Returns (folder, single file)."""
    import diffusers
    from tiny_models import SD1_SCHEDULER, build_text_encoder, build_unet, build_vae
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("ldm-tiny")
    tokenizer = CLIPTokenizer.from_pretrained(str(unpack_clip_vocabulary(root / "vocabulary")))
    pipe = diffusers.StableDiffusionPipeline(
        unet=build_unet(LDM_TINY_UNET), vae=build_vae(LDM_TINY_VAE),
        text_encoder=build_text_encoder(LDM_TINY_TEXT, vocab_size=49408, pad_id=tokenizer.pad_token_id),
        tokenizer=tokenizer, scheduler=diffusers.PNDMScheduler.from_config(SD1_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    return root / "model", ldm.save_single_file(ldm.ldm_state(pipe), root / "ldm-tiny.safetensors")


@pytest.mark.parametrize("backend_name", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])
def test_a_single_file_loads_offline_with_the_bundled_configs_and_tokenizer(ldm_tiny, backend_name, monkeypatch):
    from transformers import CLIPTokenizer

    folder, file = ldm_tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = TextToImageDiffusion(str(file), backend=backend_name, progress=False)
    ref = TextToImageDiffusion(folder, backend=backend_name, progress=False)
    assert_same_tensors(ours.backend, ref.backend)
    prompts = ["a photo of an astronaut riding a horse on mars", "!!", ""]
    assert np.array_equal(ours.tokenizer(prompts), CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))(
        prompts, padding="max_length", max_length=77, return_tensors="np").input_ids)
    assert np.array_equal(image(ours), image(ref))
    if backend_name == "mlx":  # converted once into the cache, under a key the next resolution finds again
        from mlx_stablefused.backends.mlx.loading import NETWORKS
        from mlx_stablefused.model_description import STABLE_DIFFUSION
        from mlx_stablefused.model_loading import weight_source
        from mlx_stablefused.single_file import resolve_model_or_file

        where = weight_source(resolve_model_or_file(str(file)), NETWORKS, STABLE_DIFFUSION, "float32", None, True)
        assert where.converted is not None and where.converted == ours.backend._weights_files["unet"].parents[1]


def test_convert_writes_the_folder_of_a_single_file_with_a_separate_vae(ldm_tiny, tmp_path):
    """``mlx-stablefused convert model.safetensors OUT --vae vae.safetensors``; the VAE file in LDM naming
    without the first_stage_model. prefix; a diffusers VAE folder gives the same."""
    from tiny_models import build_vae

    from mlx_stablefused.cli import main

    folder, file = ldm_tiny
    other = build_vae(LDM_TINY_VAE, seed=21)
    ldm.save_single_file(ldm.vae_to_ldm(other.state_dict(), dict(other.config), prefix=""), tmp_path / "vae.safetensors")
    other.save_pretrained(str(tmp_path / "vae-folder"), safe_serialization=True)
    assert main(["convert", str(file), str(tmp_path / "out"), "--dtype", "float32", "--vae",
                 str(tmp_path / "vae.safetensors")]) == 0
    converted = TextToImageDiffusion(tmp_path / "out", progress=False).backend
    with_folder = TextToImageDiffusion(folder, vae=str(tmp_path / "vae-folder"), progress=False, use_cache=False).backend
    reference = TextToImageDiffusion(folder, progress=False).backend
    for component in ("unet", "text_encoder"):
        assert all(np.array_equal(v, tensors(reference, component)[k]) for k, v in tensors(converted, component).items())
    vae_ours, vae_folder = tensors(converted, "vae"), tensors(with_folder, "vae")
    assert all(np.array_equal(v, vae_folder[k]) for k, v in vae_ours.items())
    assert not np.array_equal(vae_ours["decoder.conv_out.weight"], tensors(reference, "vae")["decoder.conv_out.weight"])
    assert converted.vae_config.scaling_factor == reference.vae_config.scaling_factor


# ---------------------------------------------------------------------------------------- bad input
class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mlx_stablefused_single_file_pwned",))


def test_bad_single_files_are_refused_by_name(files, sd1, sd2, tmp_path):
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_down_blocks_0.alpha": torch.zeros(())}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"SDXL.*it holds .*'conditioner.embedders' \(1 keys\)") as info:
        TextToImageDiffusion(str(tmp_path / "sdxl.safetensors"), progress=False)
    assert "'lora_unet' (1 keys)" in str(info.value) and "'model.diffusion_model' (1 keys)" in str(info.value)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["sd1_fp16"].read_bytes()[:-1000])
    with pytest.raises(WeightLoadError, match="truncated"):
        TextToImageDiffusion(str(truncated), progress=False)
    marker = Path("/tmp/mlx_stablefused_single_file_pwned")
    marker.unlink(missing_ok=True)
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"w": _Exploit()}}, f, protocol=4)
    with pytest.raises(WeightLoadError, match="refuses"):
        TextToImageDiffusion(str(tmp_path / "evil.ckpt"), progress=False)
    assert not marker.exists()
    with pytest.raises(WeightLoadError, match=r"use_ema=True, but .* has no EMA weights"):
        TextToImageDiffusion(str(files["sd2"]), config=str(sd2[1]), use_ema=True, progress=False)
    with pytest.raises(WeightLoadError, match=r"wrong shape|does not match"):  # an SD1 file with SD2's configs
        TextToImageDiffusion(str(files["sd1_fp16"]), config=str(sd2[1]), progress=False, use_cache=False)
    with pytest.raises(UnsupportedModelError, match="not a multiple of CLIP's 64-channel heads.*config="):
        TextToImageDiffusion(str(files["sd1_fp16"]), progress=False)
    with pytest.raises(ValueError, match="use_ema= apply to single-file checkpoints"):
        TextToImageDiffusion(sd1[1], use_ema=True, progress=False)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "notvae.safetensors"))
    with pytest.raises(ModelSourceError, match="no VAE found.*'model.diffusion_model'"), \
            pytest.warns(UserWarning, match=r"1 tensors belong to no network .*'model.diffusion_model'"):
        TextToImageDiffusion(sd1[1], vae=str(tmp_path / "notvae.safetensors"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelSourceError, match="could not get 'nobody/nothing/model.safetensors'"):
            TextToImageDiffusion("nobody/nothing/model.safetensors", local_files_only=True, progress=False)


@pytest.mark.slow
def test_full_size_sd15_single_file_equals_its_folder(tmp_path):
    """The full SD 1.5 architecture (random weights) as one fp16 LDM file, loaded with no config: the same
    tensors as its diffusers folder loaded in fp16. Built and compared one network at a time (~5 GB peak)."""
    import gc

    from test_slow_full_size import SD15_TEXT, SD15_UNET, SD15_VAE
    from tiny_models import SD1_SCHEDULER, build_text_encoder, build_unet, build_vae
    from transformers import CLIPTokenizer

    folder, state = tmp_path / "model", {}
    builds = {"unet": (lambda: build_unet(SD15_UNET), ldm.unet_to_ldm),
              "vae": (lambda: build_vae(SD15_VAE), ldm.vae_to_ldm),
              "text_encoder": (lambda: build_text_encoder(SD15_TEXT, vocab_size=49408, pad_id=49407), None)}
    for name, (build, to_ldm) in builds.items():
        model = build()
        model.save_pretrained(str(folder / name), safe_serialization=True)
        part = ldm.clip_to_ldm(model.state_dict()) if to_ldm is None else to_ldm(model.state_dict(), dict(model.config))
        state.update({k: v.half().contiguous() if v.is_floating_point() else v for k, v in part.items()})
        del model, part
        gc.collect()
    CLIPTokenizer.from_pretrained(str(unpack_clip_vocabulary(tmp_path / "vocabulary"))).save_pretrained(
        str(folder / "tokenizer"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER))
    file = ldm.save_single_file(state, tmp_path / "sd15.safetensors")
    del state
    gc.collect()
    ours = TextToImageDiffusion(str(file), dtype="float16", progress=False, use_cache=False).backend
    ref = TextToImageDiffusion(folder, dtype="float16", progress=False, use_cache=False).backend
    from mlx.utils import tree_flatten

    for component, attr in ROLES.items():  # one tensor at a time: no second copy of a network
        a, b = dict(tree_flatten(getattr(ours, attr).parameters())), dict(tree_flatten(getattr(ref, attr).parameters()))
        assert a.keys() == b.keys()
        for k in a:  # an fp32 VAE (force_upcast) holds the file's fp16 values
            want = np.asarray(b[k]).astype(np.float16).astype(np.asarray(b[k]).dtype) if component == "vae" else np.asarray(b[k])
            assert np.array_equal(np.asarray(a[k]), want), (component, k)
