"""Model sources, conversion, the converted-model cache, strict loading, and clear errors for bad input."""

import json
import os
import pickle
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from helpers import convert_with_cli
from safetensors.numpy import load_file, save_file

from mlx_stablefused import ModelSourceError, TextToImageDiffusion, UnsupportedModelError, WeightLoadError

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model_copy(sd1, tmp_path):
    """A private, writable copy of the tiny SD1 diffusers folder."""
    _, root = sd1
    dst = tmp_path / "model"
    shutil.copytree(root, dst)
    return dst


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """This test's own converted-model cache ($MLX_STABLEFUSED_CACHE/converted/<key>, as the README says)."""
    monkeypatch.setenv("MLX_STABLEFUSED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "converted"


def cache_state(folder):
    """Every file under ``folder`` with its modification time: what a conversion would change."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def generate(pipe, **kw):
    args = dict(prompt="the cat", num_inference_steps=2, seed=0, image_height=64, image_width=64, output_type="np")
    return pipe(**{**args, **kw})


# ------------------------------------------------------------------------------------ conversion
def test_convert_then_load_gives_identical_images(sd1, pipelines, tmp_path):
    _, root = sd1
    out = convert_with_cli(root, tmp_path / "mlx")
    manifest = json.loads((out / "mlx_manifest.json").read_text())
    assert manifest["format"] == "mlx-stablefused" and manifest["dtype"] == "float32"
    assert manifest["source"] == str(root) and manifest["converter_version"]
    for component in ("text_encoder", "unet", "vae"):
        assert (out / component / "weights.safetensors").is_file()
        assert (out / component / "config.json").is_file()
    a = generate(TextToImageDiffusion(root, progress=False, use_cache=False))
    b = generate(TextToImageDiffusion(out, progress=False))
    np.testing.assert_array_equal(a, b)


def test_convert_float16_halves_the_weights(sd1, pipelines, tmp_path):
    _, root = sd1
    out = convert_with_cli(root, tmp_path / "mlx16", dtype="float16")
    unet = mx.load(str(out / "unet" / "weights.safetensors"))
    assert all(v.dtype == mx.float16 for v in unet.values())
    pipe = TextToImageDiffusion(out, dtype="float16", progress=False)
    assert pipe.backend.vae.decoder.conv_in.weight.dtype == mx.float32  # force_upcast VAE
    img16 = generate(pipe)
    img32 = generate(pipelines.pipeline(TextToImageDiffusion, root))
    assert np.abs(img16 - img32).max() < 0.05


def test_fp16_safe_vae_config_is_honoured(model_copy):
    """A VAE whose config says ``force_upcast: false`` (madebyollin/sdxl-vae-fp16-fix) stays in float16, as in
    diffusers (it upcasts only when the config asks); the default (true) VAE runs in float32."""
    import torch

    config_file = model_copy / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    for force_upcast in (False, True):
        config_file.write_text(json.dumps({**config, "force_upcast": force_upcast}))
        mlx_pipe = TextToImageDiffusion(model_copy, dtype="float16", progress=False, use_cache=False)
        torch_pipe = TextToImageDiffusion(model_copy, backend="torch", dtype="float16", progress=False)
        assert mlx_pipe.backend.vae.decoder.conv_in.weight.dtype == (mx.float32 if force_upcast else mx.float16)
        assert torch_pipe.backend.vae_dtype == (torch.float32 if force_upcast else torch.float16)
        assert next(torch_pipe.backend.vae.parameters()).dtype == torch_pipe.backend.vae_dtype


def test_convert_refuses_to_overwrite_and_cli_works(sd1, tmp_path):
    from mlx_stablefused.cli import main

    _, root = sd1
    dst = tmp_path / "cli-out"
    assert main(["convert", str(root), str(dst), "--dtype", "float32"]) == 0
    assert (dst / "mlx_manifest.json").is_file()
    assert main(["convert", str(root), str(dst)]) == 1  # exists: a clear error, exit 1
    assert main(["convert", str(root), str(dst), "--overwrite"]) == 0


def test_failed_conversion_leaves_nothing_behind(model_copy, tmp_path, capsys):
    from mlx_stablefused.cli import main

    unet = model_copy / UNET_FILE
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "never"
    assert main(["convert", str(model_copy), str(dst)]) == 1
    assert "truncated" in capsys.readouterr().err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    with pytest.raises(WeightLoadError, match="truncated"):  # and the same file named by the Python API
        TextToImageDiffusion(model_copy, progress=False)


def test_on_the_fly_conversion_is_cached(model_copy, own_cache):
    first = generate(TextToImageDiffusion(model_copy, progress=False))  # converts into the cache
    converted = cache_state(own_cache)
    assert len(list(own_cache.iterdir())) == 1
    second = generate(TextToImageDiffusion(model_copy, progress=False))
    assert cache_state(own_cache) == converted  # the second load converted nothing
    np.testing.assert_array_equal(first, second)


def test_cache_key_changes_when_weights_change(model_copy, own_cache):
    TextToImageDiffusion(model_copy, progress=False)
    os.utime(model_copy / UNET_FILE, ns=(1, 1))
    TextToImageDiffusion(model_copy, progress=False)
    assert len(list(own_cache.iterdir())) == 2  # new weights: a new converted copy
    TextToImageDiffusion(model_copy, progress=False, dtype="float16")
    assert len(list(own_cache.iterdir())) == 3  # another dtype: another copy


def test_pytorch_bin_is_read_safely(model_copy):
    import torch

    te = model_copy / "text_encoder"
    tensors = load_file(str(te / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, te / "pytorch_model.bin")
    (te / "model.safetensors").unlink()
    pipe = TextToImageDiffusion(model_copy, progress=False, use_cache=False)
    assert generate(pipe).shape == (1, 64, 64, 3)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mlx_stablefused_pwned",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_not_executed(model_copy, protocol):
    te = model_copy / "text_encoder"
    (te / "model.safetensors").unlink()
    with open(te / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Exploit()}, f, protocol=protocol)
    if os.path.exists("/tmp/mlx_stablefused_pwned"):
        os.unlink("/tmp/mlx_stablefused_pwned")
    with pytest.raises(WeightLoadError, match="safe PyTorch checkpoint: it holds what a weights-only reader refuses") as info:
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)
    assert not os.path.exists("/tmp/mlx_stablefused_pwned")
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)  # one line, no bad advice


# -------------------------------------------------------------------------------- strict weights
def test_corrupt_header(model_copy):
    path = model_copy / UNET_FILE
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(WeightLoadError, match="corrupt"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


def test_not_a_safetensors_file(model_copy):
    (model_copy / UNET_FILE).write_bytes(struct.pack("<Q", 10**12) + b"garbage")
    with pytest.raises(WeightLoadError, match="truncated or corrupt"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


def _edit_unet(model_copy, edit):
    path = model_copy / UNET_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_key_is_named(model_copy):
    _edit_unet(model_copy, lambda t: t.pop("conv_in.bias"))
    with pytest.raises(WeightLoadError, match=r"1 missing: 'conv_in\.bias'"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


def test_unexpected_key_is_named(model_copy):
    _edit_unet(model_copy, lambda t: t.update({"extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightLoadError, match=r"unexpected: 'extra\.weight'"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


def test_wrong_shape_is_named(model_copy):
    _edit_unet(model_copy, lambda t: t.update({"conv_out.bias": np.zeros(5, np.float32)}))
    with pytest.raises(WeightLoadError, match=r"1 weight\(s\) with the wrong shape: 'conv_out\.bias' has shape \(5,\)"
                                               r" but the model expects \(4,\)"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


def test_config_that_does_not_match_weights(model_copy):
    cfg_path = model_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"wrong shape: .*attn2\.to_k\.weight' has shape \(\d+, 32\)"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


def test_unsupported_architecture_is_refused(model_copy):
    cfg_path = model_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["addition_embed_type"] = "text_time"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="addition_embed_type"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


def test_missing_weight_file(model_copy):
    (model_copy / UNET_FILE).unlink()
    with pytest.raises(ModelSourceError, match="no weights in"):
        TextToImageDiffusion(model_copy, progress=False, use_cache=False)


# ---------------------------------------------------------------------------------------- sources
def test_missing_path():
    with pytest.raises(ModelSourceError, match="does not exist"):
        TextToImageDiffusion("./no/such/model", progress=False)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelSourceError, match="neither a diffusers model folder"):
        TextToImageDiffusion(tmp_path, progress=False)


def test_single_file_is_explained(tmp_path):
    """Single files load (tests/test_single_file.py); a broken one or a file that is no checkpoint is named."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(WeightLoadError, match=f"{f} is truncated or not a safetensors file"):
        TextToImageDiffusion(f, progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelSourceError, match="notes.txt: not a checkpoint file"):
        TextToImageDiffusion(tmp_path / "notes.txt", progress=False)


def test_hub_id_offline_says_how_to_pass_a_path(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)  # model_index.json: no real request, no retries
    monkeypatch.setattr("mlx_stablefused.hub_access.offline_reason", lambda *a, **k: None)  # the probe says online
    with pytest.raises(ModelSourceError, match="pass its folder"):
        TextToImageDiffusion("someone/not-cached-model-xyz", progress=False)


def test_hub_id_with_local_files_only():
    with pytest.raises(ModelSourceError, match="not in the local cache"):
        TextToImageDiffusion("someone/not-cached-model-xyz", local_files_only=True, progress=False)


# ------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def pipe(sd1, pipelines):
    return pipelines.pipeline(TextToImageDiffusion, sd1[1])


@pytest.mark.parametrize("kw,match", [
    (dict(image_height=60), "multiple of 8"),
    (dict(image_width=0), "positive integer"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="tensor"), "unknown output_type"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative prompt"),
    (dict(latent=np.zeros((1, 4, 8), np.float32)), r"\(B, C, h, w\)"),
    (dict(latent=np.zeros((2, 4, 8, 8), np.float32)), "expected"),
    (dict(latent=np.zeros((1, 4, 8, 8), np.float32), image_height=128), "gives 64x64 images"),
    (dict(seed=-1), "seed"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
])
def test_bad_arguments_raise_value_errors(pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(pipe, **kw)


def test_bad_prompt_type(pipe):
    with pytest.raises(TypeError, match="prompt must be"):
        generate(pipe, prompt=3)


def test_unknown_scheduler_and_dtype(pipe, sd1):
    with pytest.raises(ValueError, match="valid names"):
        pipe.set_scheduler("fastest")
    with pytest.raises(ValueError, match="unknown dtype"):
        TextToImageDiffusion(sd1[1], dtype="float8", progress=False)
    with pytest.raises(ValueError, match="unknown backend"):
        TextToImageDiffusion(sd1[1], backend="jax", progress=False)


def test_inpainting_model_refused_by_text_to_image(model_copy):
    from tiny_models import INPAINT_UNET, build_unet

    shutil.rmtree(model_copy / "unet")
    build_unet(INPAINT_UNET).save_pretrained(str(model_copy / "unet"), safe_serialization=True)
    pipe = TextToImageDiffusion(model_copy, progress=False, use_cache=False)
    with pytest.raises(UnsupportedModelError, match="inpainting"):
        generate(pipe)


def test_mis_shaped_kernel_poisons_no_cache_and_names_the_checkpoint_shape(model_copy, own_cache, backend_name,
                                                                           capsys):
    """A kernel of the wrong shape is refused before anything reaches the conversion cache; the error names
    the source folder and the shape as the checkpoint holds it; `convert` exits 1 and writes nothing."""
    from mlx_stablefused.cli import main

    _edit_unet(model_copy, lambda t: t.update({"conv_in.weight": np.zeros((16, 4, 3, 5), np.float32)}))
    with pytest.raises(WeightLoadError, match=r"unet: 1 weight\(s\) with the wrong shape: 'conv_in\.weight' has shape "
                                               r"\(16, 4, 3, 5\)") as info:
        TextToImageDiffusion(model_copy, progress=False, backend=backend_name)
    assert str(model_copy) in str(info.value)
    if backend_name == "mlx":
        assert "in the checkpoint ((16, 3, 5, 4) in this backend's layout) but the model expects (16, 3, 3, 4)" \
            in str(info.value)
    assert not own_cache.exists() or not any(own_cache.iterdir())  # no cache entry, not even a partial one
    capsys.readouterr()
    assert main(["convert", str(model_copy), str(model_copy.parent / "converted")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conv_in.weight" in err[0]
    assert not (model_copy.parent / "converted").exists()
