"""Files users bring to SDXL, on the tiny SDXL models: single-file checkpoints in Stability's layout
(``conditioner.embedders.*``), kohya-named SDXL LoRAs and two-encoder textual-inversion embeddings
(``clip_l`` / ``clip_g``). Each test file is made here from the diffusers models and read back by diffusers
itself first (``from_single_file(config=folder)``, ``load_lora_weights``, ``load_textual_inversion``), so the
oracle is diffusers on the same file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import ldm_checkpoints as ldm
import numpy as np
import pytest
import torch
from helpers import max_abs_error, report

from mlx_stablefused import ImageToImageDiffusion, TextToImageDiffusion
from mlx_stablefused.errors import ModelSourceError
from mlx_stablefused.ldm_checkpoint import (OriginalConfig, checkpoint_shapes, clip_config, key_maps, mapped_shapes,
                                            plan_checkpoint, unet_config)

SDXL_ROLES = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


def _torch_state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


@pytest.fixture(scope="module")
def sdxl_files(sdxl, sdxl_refiner, tmp_path_factory):
    """The tiny SDXL base (fp16 .safetensors) and refiner (fp32 .ckpt) as Stability single files."""
    root = tmp_path_factory.mktemp("sdxl-single-files")
    return {"base": ldm.save_single_file(ldm.sdxl_state(sdxl[0]), root / "sdxl.safetensors", torch.float16),
            "refiner": ldm.save_single_file(ldm.sdxl_state(sdxl_refiner[0]), root / "refiner.ckpt")}


@pytest.mark.slow
def test_the_sdxl_test_files_are_what_diffusers_from_single_file_reads(sdxl_files, sdxl, sdxl_refiner):
    """diffusers' own converter (config= the folder, offline) gives back the tiny models' tensors."""
    import diffusers

    cases = (("base", sdxl, diffusers.StableDiffusionXLPipeline, torch.float16),
             ("refiner", sdxl_refiner, diffusers.StableDiffusionXLImg2ImgPipeline, torch.float32))
    for case, (ref, folder), cls, dtype in cases:
        pipe = cls.from_single_file(str(sdxl_files[case]), config=str(folder), local_files_only=True,
                                    torch_dtype=dtype)
        for name in SDXL_ROLES:
            if getattr(ref, name, None) is None:
                assert getattr(pipe, name, None) is None, (case, name)
                continue
            want, got = _torch_state(getattr(ref, name)), _torch_state(getattr(pipe, name))
            assert want.keys() == got.keys(), (case, name)
            bad = [k for k in want if not torch.equal(want[k].to(dtype), got[k])]
            assert not bad, f"{case} {name}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def _sdxl_tensors(backend) -> dict[str, dict[str, np.ndarray]]:
    from mlx.utils import tree_flatten

    return {name: {k: np.asarray(v) for k, v in tree_flatten(backend.components[name].parameters())}
            for name in backend.components}


def test_sdxl_single_files_equal_their_folders(sdxl_files, sdxl, sdxl_refiner, pipelines):
    """Base (fp16 file, both encoders) and refiner (its one OpenCLIP encoder, aesthetic score) from one file
    with config= the folder: every tensor and the images identical to the folder's (MLX)."""
    base = TextToImageDiffusion(str(sdxl_files["base"]), config=str(sdxl[1]), dtype="float16", progress=False)
    folder = TextToImageDiffusion(components=pipelines.components(TextToImageDiffusion, sdxl[1], dtype="float16"),
                                  progress=False)
    ours, want = _sdxl_tensors(base.backend), _sdxl_tensors(folder.backend)
    assert ours.keys() == want.keys() == {"text_encoder", "text_encoder_2", "unet", "vae"}
    for name in want:
        assert ours[name].keys() == want[name].keys(), name
        assert all(np.array_equal(ours[name][k], want[name][k]) for k in want[name]), name
    run = dict(prompt="a red boat", num_inference_steps=2, seed=3, output_type="np", original_size=(40, 32))
    assert np.array_equal(base(image_height=32, image_width=32, **run), folder(image_height=32, image_width=32, **run))

    refiner = ImageToImageDiffusion(str(sdxl_files["refiner"]), config=str(sdxl_refiner[1]), progress=False)
    ref_folder = pipelines.pipeline(ImageToImageDiffusion, sdxl_refiner[1])
    assert set(refiner.backend.components) == {"text_encoder_2", "unet", "vae"}
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    refine = dict(prompt="a red boat", num_inference_steps=2, strength=0.6, seed=3, output_type="np",
                  aesthetic_score=7.0)
    assert np.array_equal(refiner(image, **refine), ref_folder(image, **refine))


@pytest.mark.slow
def test_sdxl_single_file_on_the_torch_backend(sdxl_files, sdxl_refiner, pipelines):
    ours = ImageToImageDiffusion(str(sdxl_files["refiner"]), config=str(sdxl_refiner[1]), backend="torch", progress=False)
    want = pipelines.components(ImageToImageDiffusion, sdxl_refiner[1], "torch").backend.components
    for name, module in ours.backend.components.items():
        a, b = module.state_dict(), want[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_what_an_sdxl_file_says_is_inferred(sdxl_files, sdxl, sdxl_refiner):
    """The family from the keys (base: CLIP-L + OpenCLIP, refiner: OpenCLIP only); block structure, depths,
    widths, projections and the add_embedding from the shapes, as the folders' configs say (the tiny models'
    heads are not SDXL's 64-channel ones, so the architecture-wide inference is the full-size test's); a
    config= of the other family is refused by name."""
    for case, (_, folder) in (("base", sdxl), ("refiner", sdxl_refiner)):
        shapes = checkpoint_shapes(sdxl_files[case])
        plan = key_maps(shapes, case)
        assert plan.family == {"base": "sdxl", "refiner": "sdxl_refiner"}[case]
        assert set(plan.key_maps) == {"unet", "vae", "text_encoder_2"} | ({"text_encoder"} if case == "base" else set())
        unet_shapes = mapped_shapes(shapes, plan.key_maps["unet"])
        unet = unet_config(unet_shapes, {t: t for t in unet_shapes}, plan.unet_blocks, plan.family, OriginalConfig())
        want = json.loads((folder / "unet" / "config.json").read_text())
        for key in ("in_channels", "block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim",
                    "use_linear_projection", "transformer_layers_per_block"):
            assert unet[key] == want[key] or [unet[key]] * 3 == want[key], (case, key)
        assert unet_shapes["add_embedding.linear_1.weight"][1] == want["projection_class_embeddings_input_dim"]
        for name in plan.key_maps.keys() - {"unet", "vae"}:
            inferred = clip_config(mapped_shapes(shapes, plan.key_maps[name]))
            expected = json.loads((folder / name / "config.json").read_text())
            assert {k: expected[k] for k in inferred} == inferred, (case, name)
    with pytest.raises(ModelSourceError, match=r"describes Stable Diffusion XL refiner .* is Stable Diffusion XL \("):
        TextToImageDiffusion(str(sdxl_files["base"]), config=str(sdxl_refiner[1]), progress=False)


@pytest.mark.slow
def test_full_size_sdxl_architectures_are_inferred_from_the_tensors():
    """SDXL base 1.0 and refiner 1.0 shapes (built on the meta device): every config field the hub repos'
    configs have is inferred or taken from the family's template, equal to the repos' values."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mlx_stablefused.ldm_checkpoint import TEMPLATES

    for family in ("sdxl", "sdxl_refiner"):
        template = json.loads((TEMPLATES / f"{family}.json").read_text())
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**{k: v for k, v in template["unet"].items() if k != "_class_name"})
            vae = diffusers.AutoencoderKL(**{k: v for k, v in template["vae"].items() if k != "_class_name"})
            texts = {name: cls(CLIPTextConfig(**template[name])) for name, cls in
                     (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)) if name in template}
        parts = SimpleNamespace(unet=unet, vae=vae, text_encoder=texts.get("text_encoder"),
                                   text_encoder_2=texts["text_encoder_2"])
        shapes = {k: tuple(v.shape) for k, v in ldm.sdxl_state(parts, clone=False).items()}
        configs = plan_checkpoint(shapes, family).configs
        for name in ("unet", "vae", *texts):
            assert {k: configs[name].get(k) for k in template[name]} == template[name], (family, name)
        assert configs["model_index"] == template["model_index"]


# ------------------------------------------------------------------------- two-encoder textual inversion
TI_PROMPTS, TI_NEGATIVE = ["a sdxl-emb lighthouse", "sdxl-emb"], "blurry, sdxl-emb"


@pytest.fixture(scope="module")
def sdxl_embedding(sdxl, tmp_path_factory):
    """An AUTOMATIC1111 / civitai SDXL embedding (one safetensors file, clip_l and clip_g, two vectors), and
    diffusers with it loaded as diffusers documents (load_textual_inversion twice, with text_encoder/tokenizer
    and text_encoder_2/tokenizer_2), on copies of the session's encoders and tokenizers."""
    import copy

    from helpers import diffusers_pipeline
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(12)
    path = tmp_path_factory.mktemp("sdxl-embedding") / "sdxl-emb.safetensors"
    save_file({key: torch.from_numpy(rng.standard_normal((2, width)).astype(np.float32) * 0.5)
               for key, width in (("clip_l", 32), ("clip_g", 48))}, str(path))
    session = sdxl[0]
    ref = diffusers_pipeline(session)
    ref.register_modules(**{name: copy.deepcopy(getattr(session, name))
                            for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")})
    state = load_file(str(path))
    ref.load_textual_inversion(state["clip_l"], token="sdxl-emb", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="sdxl-emb", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    pipe = TextToImageDiffusion(sdxl[1], progress=False)  # private: embeddings change the model
    added = pipe.load_textual_inversion(path)
    return path, ref, pipe, added


def test_two_encoder_textual_inversion_matches_diffusers(sdxl_embedding, tmp_path):
    """Both tokenizers' ids, the states and pooled embeddings equal diffusers' (MLX); the rows survive a
    low-memory release; a one-encoder embedding on SDXL and the SDXL one on SD 1 are refused by name."""
    from helpers import rel_error
    from safetensors.torch import load_file, save_file

    from mlx_stablefused.errors import WeightLoadError
    from mlx_stablefused.textual_inversion import embedding_from_state

    path, ref, pipe, added = sdxl_embedding
    assert added == ["sdxl-emb", "sdxl-emb_1"]  # the token: the file's name, as AUTOMATIC1111 names it
    for name, tokenizer in (("text_encoder", ref.tokenizer), ("text_encoder_2", ref.tokenizer_2)):
        for prompt in [*TI_PROMPTS, TI_NEGATIVE]:
            expected = tokenizer(ref.maybe_convert_prompt(prompt, tokenizer), padding="max_length", max_length=77,
                                 truncation=True).input_ids
            assert pipe.components.tokenizers[name]([prompt])[0].tolist() == expected, (name, prompt)
    with torch.no_grad():
        want = ref.encode_prompt(TI_PROMPTS, None, "cpu", 1, True, TI_NEGATIVE)
    embeds, pooled = pipe.prompt_to_embedding(TI_PROMPTS, TI_NEGATIVE)
    to_np = pipe.backend.to_numpy
    assert report("SDXL two-encoder textual inversion: states vs diffusers (rel.)", rel_error(
        to_np(embeds), np.concatenate([want[1].numpy(), want[0].numpy()]))) < 1e-4
    assert report("SDXL two-encoder textual inversion: pooled vs diffusers (rel.)", rel_error(
        to_np(pooled), np.concatenate([want[3].numpy(), want[2].numpy()]))) < 1e-4
    assert pipe.backend.release_text_encoder()  # low memory re-reads both encoders' weights: the rows stay
    assert all(np.array_equal(to_np(a), to_np(b)) for a, b in zip(pipe.prompt_to_embedding(TI_PROMPTS, TI_NEGATIVE),
                                                                 (embeds, pooled)))

    size = {name: len(t) for name, t in pipe.components.tokenizers.items()}
    save_file({"emb_params": torch.zeros(2, 32)}, str(tmp_path / "one-emb.safetensors"))
    with pytest.raises(WeightLoadError, match=r"one-emb.safetensors is not an SDXL embedding: SDXL models need "
                                              r"'clip_l' and 'clip_g' vectors .*found \['emb_params'\]"):
        pipe.load_textual_inversion(tmp_path / "one-emb.safetensors")
    with pytest.raises(ValueError, match=r"\[clip_g\]: the embedding for 'wide' is 32 wide, .* takes 48-wide"):
        pipe.load_textual_inversion({"clip_l": np.zeros((1, 32), np.float32), "clip_g": np.zeros((1, 32), np.float32)},
                                    token="wide")
    assert {name: len(t) for name, t in pipe.components.tokenizers.items()} == size
    with pytest.raises(WeightLoadError, match="is an SDXL embedding .* this model has one text encoder"):
        embedding_from_state(load_file(str(path)), None, str(path))  # what a one-encoder model reads it with


@pytest.mark.slow
def test_two_encoder_textual_inversion_image_matches_diffusers(sdxl_embedding):
    _, ref, pipe, _ = sdxl_embedding
    noise = np.random.default_rng(6).standard_normal((2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref(TI_PROMPTS, negative_prompt=TI_NEGATIVE, latents=torch.from_numpy(noise), num_inference_steps=2,
                   height=32, width=32, guidance_scale=5.0, output_type="np").images
    got = pipe(TI_PROMPTS, negative_prompt=TI_NEGATIVE, latent=noise, num_inference_steps=2, guidance_scale=5.0,
               output_type="np")
    assert report("SDXL two-encoder textual inversion: image vs diffusers", max_abs_error(got, want)) < 5e-3
