"""The model description drives loading: configs read once, modules built once, a new component is data,
no import circle, and the demo model runs on torch without MLX."""

import ast
import builtins
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from mlx_stablefused import WeightLoadError, model_loading
from mlx_stablefused.backends import create_backend
from mlx_stablefused.model_description import CLIP_TEXT_MODEL, STABLE_DIFFUSION, TRANSFORMERS_STEMS, Component
from mlx_stablefused.sources import resolve_model
from mlx_stablefused.tokenizer import CLIPTokenizer

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mlx_stablefused"
NEUTRAL_MODULES = ("sources", "weights", "model_description", "converted_format", "model_loading", "demo",
                   "motion_adapters", "config", "checkpoint_io", "tiny_autoencoder", "previews", "backends.auto")


def _networks_class(backend_name):
    if backend_name == "mlx":
        from mlx_stablefused.backends.mlx.loading import MLXNetworks

        return MLXNetworks
    from mlx_stablefused.backends.torch.loading import TorchNetworks

    return TorchNetworks


def _backend(backend_name, source, **options):
    return create_backend(backend_name, source, **({"device": "cpu"} if backend_name == "torch" else {}), **options)


def _python(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


# ------------------------------------------------------------------------------ no MLX, no circle
DEMO_WITHOUT_MLX = """
import sys
sys.modules["mlx"] = None  # every `import mlx...` now raises ImportError
import numpy as np
from mlx_stablefused import TextToImageDiffusion

pipe = TextToImageDiffusion("demo:tiny-random", backend="torch", device="cpu", progress=False)
image = pipe("a red boat", num_inference_steps=1, image_height=64, image_width=64, seed=0, output_type="np")
assert not [m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "mlx"]
np.save(sys.argv[1], image)
"""


def test_demo_runs_on_torch_without_mlx(tmp_path):
    cache = tmp_path / "cache"
    proc = _python("-c", DEMO_WITHOUT_MLX, str(tmp_path / "torch_built.npy"),
                   env_extra={"MLX_STABLEFUSED_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = next(cache.glob("demo-v*"))
    assert (demo / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # a diffusers folder, built by torch
    assert not (demo / "mlx_manifest.json").exists()
    # The same model as the MLX-built demo (a converted folder): weights are drawn in one layout, whoever draws.
    from mlx_stablefused import TextToImageDiffusion

    pipe = TextToImageDiffusion("demo:tiny-random", backend="torch", device="cpu", progress=False)
    mlx_built = pipe("a red boat", num_inference_steps=1, image_height=64, image_width=64, seed=0, output_type="np")
    assert pipe.source.origin == "demo:tiny-random"
    assert np.abs(np.load(tmp_path / "torch_built.npy") - mlx_built).max() < 1e-6
    torch_built = _backend("torch", resolve_model(demo))
    for name, module in pipe.backend.components.items():
        theirs = torch_built.components[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name


def test_neutral_modules_import_no_framework():
    names = ", ".join(f"mlx_stablefused.{m}" for m in NEUTRAL_MODULES)
    proc = _python("-c", f"import sys, {names}; "
                         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def _import_graph() -> dict[str, set[str]]:
    """Every import inside the package, function-level ones included: module -> package modules it imports."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import converted_format` names a module
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in files else module)
    # A package's __init__ runs before any of its modules whatever they import, so it is no edge of a circle.
    modules = {n for n, p in files.items() if p.name != "__init__.py"}
    return {k: {t for t in v if t in modules} for k, v in graph.items() if k in modules}


def _reaches(graph, start, goal):
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_no_import_circle():
    graph = _import_graph()
    assert sorted(m for m in graph if _reaches(graph, m, m)) == []  # was sources -> demo -> motion_adapters ...
    for low in ("sources", "motion_adapters", "model_loading", "model_description"):
        assert not _reaches(graph, f"mlx_stablefused.{low}", "mlx_stablefused.demo"), low


# ------------------------------------------------------------------------- read once, build once
def _count_config_reads(monkeypatch) -> Counter:
    reads: Counter = Counter()
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "config.json" and "r" in mode:
            reads[Path(file).parent.name] += 1
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return reads


def _count_builds(monkeypatch, networks_class) -> Counter:
    builds: Counter = Counter()

    def counted(name, cls):
        def build(*args, **kwargs):
            builds[name] += 1
            return cls(*args, **kwargs)
        return build

    monkeypatch.setattr(networks_class, "classes", {n: counted(n, c) for n, c in networks_class.classes.items()})
    return builds


def test_a_load_reads_each_config_once_and_builds_each_module_once(sd1, tmp_path, monkeypatch, backend_name):
    _, root = sd1
    monkeypatch.setenv("MLX_STABLEFUSED_CACHE", str(tmp_path / "cache"))
    source = resolve_model(root)
    once = {"text_encoder": 1, "unet": 1, "vae": 1}
    built_once = {"CLIPTextModel": 1, "UNet2DConditionModel": 1, "AutoencoderKL": 1}
    for attempt in ("first load (converts into the cache on MLX)", "second load"):
        reads, builds = _count_config_reads(monkeypatch), _count_builds(monkeypatch, _networks_class(backend_name))
        backend = _backend(backend_name, source)
        assert dict(reads) == once, attempt
        assert dict(builds) == built_once, attempt
        monkeypatch.undo()
        monkeypatch.setenv("MLX_STABLEFUSED_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(model_loading, "write_converted", lambda *a, **k: pytest.fail("converted twice"))
    assert set(backend.components) == {"text_encoder", "unet", "vae"}
    assert backend.configs["vae"] is backend.vae_config and backend.components["unet"] is backend.unet_model
    if backend_name == "mlx":  # the weights assigned on the first load are the ones written to the cache
        import mlx.core as mx
        from mlx.utils import tree_flatten

        written = mx.load(str(backend._weights_files["unet"]))
        params = dict(tree_flatten(backend.unet_model.parameters()))
        assert set(written) == set(params)
        assert all(mx.array_equal(written[k], params[k]).item() for k in written)


# ------------------------------------------------------------------- a new component is only data
SECOND_CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                   max_position_embeddings=77, hidden_act="gelu")


@pytest.fixture(scope="module")
def two_encoder_model(sd1, tmp_path_factory):
    """The SD1 tiny model plus a second, different CLIP text encoder and tokenizer (as SDXL has)."""
    from tiny_models import build_text_encoder

    _, root = sd1
    model = tmp_path_factory.mktemp("two-encoders") / "model"
    shutil.copytree(root, model)
    shutil.copytree(model / "tokenizer", model / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_folder(model / "tokenizer")
    reference = build_text_encoder(SECOND_CLIP, tokenizer.vocab_size, tokenizer.pad_token_id, seed=9)
    reference.save_pretrained(str(model / "text_encoder_2"), safe_serialization=True)
    return model, reference


TWO_ENCODERS = STABLE_DIFFUSION.adding(
    Component("text_encoder_2", "text_encoder", (CLIP_TEXT_MODEL,), TRANSFORMERS_STEMS, tokenizer="tokenizer_2"))


def _hidden_states(backend, ids):
    module = backend.components["text_encoder_2"]
    if backend.name == "mlx":
        import mlx.core as mx

        return np.asarray(module(mx.array(ids)).last_hidden_state)
    with torch.no_grad():
        return module(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()


def test_adding_a_component_is_enough_to_load_it(two_encoder_model, tmp_path, monkeypatch, backend_name):
    model, reference = two_encoder_model
    monkeypatch.setenv("MLX_STABLEFUSED_CACHE", str(tmp_path / "cache"))
    ids = CLIPTokenizer.from_folder(model / TWO_ENCODERS.tokenizers["text_encoder_2"])(["a photo of the cat", ""])
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    loads = ["diffusers folder"] + (["its converted copy in the cache"] if backend_name == "mlx" else [])
    for what in loads:
        backend = _backend(backend_name, resolve_model(model), description=TWO_ENCODERS)
        assert backend.configs["text_encoder_2"].num_hidden_layers == 3, what
        assert backend.text_config.num_hidden_layers == 2  # the first text encoder keeps the old attribute
        got = _hidden_states(backend, ids)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4, what
    if backend_name == "mlx":
        manifest = json.loads(next((tmp_path / "cache" / "converted").glob("*/mlx_manifest.json")).read_text())
        assert manifest["components"] == ["text_encoder", "unet", "vae", "text_encoder_2"]
    # strict like every component: a missing tensor is named
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "text_encoder_2" / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = next(k for k in tensors if k.endswith("final_layer_norm.bias"))
    del tensors[dropped]
    save_file(tensors, str(weights))
    with pytest.raises(WeightLoadError, match=r"1 missing: 'text_model\.final_layer_norm\.bias'"):
        _backend(backend_name, resolve_model(broken), description=TWO_ENCODERS, use_cache=False)


def test_hub_download_fetches_what_the_description_lists(tmp_path, monkeypatch):
    import huggingface_hub

    repo_files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                  "tokenizer_2/vocab.json", "safety_checker/config.json", "safety_checker/model.safetensors"]
    for c in TWO_ENCODERS.components:
        stem = c.weight_stems[0]
        repo_files += [f"{c.folder}/config.json", f"{c.folder}/{stem}.safetensors", f"{c.folder}/{stem}.fp16.safetensors"]
    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked["patterns"] = set(allow_patterns)
        (tmp_path / "model_index.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: repo_files)
    monkeypatch.setattr("mlx_stablefused.hub_access.offline_reason", lambda *a, **k: None)  # the probe says online
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolve_model("someone/sdxl-like", variant="fp16", description=TWO_ENCODERS)
    for c in TWO_ENCODERS.components:
        stem = c.weight_stems[0]
        assert {f"{c.folder}/config.json", f"{c.folder}/{stem}.fp16.safetensors"} <= asked["patterns"], c.name
        assert f"{c.folder}/{stem}.safetensors" not in asked["patterns"]
    assert {"tokenizer/*", "tokenizer_2/*", "model_index.json"} <= asked["patterns"]
    assert not [p for p in asked["patterns"] if p.startswith("safety_checker")]
