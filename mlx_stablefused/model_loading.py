"""Load a described model into one backend's modules, written once for every backend.

Shared here: choosing the weight files, reading each ``config.json`` once, key mapping, the strict
name and shape checks, the dtype policy, and the MLX conversion cache (a diffusers model converted on
first load is built once, converted in memory, written to the cache, and those same weights assigned).
A backend supplies only a ``Networks``: its module classes by diffusers class name, building a module
from a parsed config, its parameter shapes, reading a weight file, turning a tensor into its native
layout, and assigning weights. This module imports no framework.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import __version__
from . import converted_format as fmt
from .checkpoint_io import atomic_directory, write_json
from .config import MotionConfig, read_json
from .errors import ModelSourceError
from .model_description import STABLE_DIFFUSION, Component, ModelDescription, ModuleKind
from .motion_adapters import MotionAdapterSource, motion_state
from .sources import ComponentFiles, ModelSource, cache_root, local_weight_file, weight_files
from .weights import check_names, check_shapes, map_keys, take

DIFFUSERS_LAYOUT = "diffusers"  # PyTorch layout, as diffusers / transformers save it
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# The attributes pipelines read on a backend, per component role: (module attribute, config attribute).
ROLE_ATTRIBUTES = {"text_encoder": ("text_encoder", "text_config"), "unet": ("unet_model", "unet_config"),
                   "vae": ("vae", "vae_config")}


class Networks(ABC):
    """What one backend contributes to loading (everything else is in this module)."""

    name: str
    layout: str  # the tensor layout of this backend's modules: DIFFUSERS_LAYOUT or converted_format.LAYOUT
    classes: Mapping[str, Callable[..., Any]]  # diffusers class name -> module class
    dtypes: Mapping[str, Any]  # dtype name (DTYPE_NAMES) -> the framework's dtype

    @classmethod
    def native_dtype(cls, dtype: Any) -> Any:
        """A dtype name, or already one of the framework's dtypes, as the framework's dtype."""
        if isinstance(dtype, str):
            return cls.dtypes[check_dtype(dtype)]
        if dtype not in cls.dtypes.values():
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_NAMES)}")
        return dtype

    @classmethod
    def dtype_name(cls, dtype: Any) -> str:
        return next(name for name, v in cls.dtypes.items() if v == cls.native_dtype(dtype))

    @property
    def caches_conversion(self) -> bool:
        """Whether diffusers models are converted once into the cache (backends in the converted layout)."""
        return self.layout == fmt.LAYOUT

    def build(self, kind: ModuleKind, config: Any, **extra: Any) -> Any:
        if kind.class_name not in self.classes:
            raise ModelSourceError(f"the {self.name} backend has no {kind.class_name} module")
        return self.classes[kind.class_name](config, **extra)

    @abstractmethod
    def parameter_shapes(self, module: Any) -> dict[str, tuple[int, ...]]: ...

    @abstractmethod
    def read(self, path: Path) -> dict[str, Any]:
        """All tensors of one weight file, in the file's own layout."""

    def read_keys(self, path: Path, keys: set[str]) -> dict[str, Any]:
        """The tensors named ``keys`` of one weight file (a part of a single-file checkpoint); a backend whose
        ``read`` is not lazy reads only these."""
        state = self.read(path)
        return {k: state[k] for k in keys if k in state}

    @abstractmethod
    def to_native(self, value: Any, target_shape: tuple[int, ...], layout: str) -> Any:
        """One tensor from ``layout`` into this backend's layout for a parameter of ``target_shape``."""

    @abstractmethod
    def assign(self, module: Any, weights: Mapping[str, Any], dtype: str) -> Any:
        """Make ``weights`` (names and shapes already checked) the module's parameters, in ``dtype``."""

    def cast(self, value: Any, dtype: str) -> Any:
        raise NotImplementedError(f"the {self.name} backend does not write converted folders")

    def save(self, path: Path, weights: Mapping[str, Any], metadata: dict[str, str]) -> None:
        raise NotImplementedError(f"the {self.name} backend does not write converted folders")


@dataclass(frozen=True)
class ParsedComponent:
    """One component of one folder: its config read once, the network kind it names, the parsed config."""

    component: Component
    raw_config: dict = field(repr=False)
    kind: ModuleKind
    config: Any


@dataclass
class LoadedModel:
    description: ModelDescription
    parsed: dict[str, ParsedComponent]
    modules: dict[str, Any]
    dtypes: dict[str, str]
    motion_config: MotionConfig | None = None
    weights_files: dict[str, Path] = field(default_factory=dict)  # converted files, to re-read lazily

    @property
    def configs(self) -> dict[str, Any]:
        return {name: p.config for name, p in self.parsed.items()}

    @property
    def is_video_unet(self) -> bool:
        unet = self.description.first_with_role("unet")
        return self.motion_config is not None or (
            unet is not None and self.parsed[unet.name].kind.class_name == "UNet3DConditionModel")

    def backend_fields(self) -> dict[str, Any]:
        """The backend attributes pipelines use: dicts by component name, and the first component of each
        role under its historical names (``text_encoder``/``text_config``, ``unet_model``/``unet_config`` ...)."""
        fields: dict[str, Any] = {"description": self.description, "components": dict(self.modules),
                                  "configs": self.configs, "motion_config": self.motion_config,
                                  "is_video_unet": self.is_video_unet}
        for role, (module_attr, config_attr) in ROLE_ATTRIBUTES.items():
            c = self.description.first_with_role(role)
            if c is not None:
                fields[module_attr], fields[config_attr] = self.modules[c.name], self.parsed[c.name].config
        return fields


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_NAMES)}")
    return dtype


def parse_component(root: Path, component: Component, config: Path | None = None) -> ParsedComponent:
    path = Path(config) if config is not None else Path(root) / component.folder / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing")
    raw = read_json(path)
    kind = component.kind_for(raw)
    return ParsedComponent(component, raw, kind, kind.parse_config(raw))


def parse_components(root: Path, description: ModelDescription,
                     overrides: Mapping[str, ComponentFiles] | None = None) -> dict[str, ParsedComponent]:
    """Every component's config, read once and parsed (unsupported fields are refused here, before work);
    ``overrides`` (a source's components read from elsewhere) bring their own config files."""
    overrides = overrides or {}
    return {c.name: parse_component(root, c, getattr(overrides.get(c.name), "config", None))
            for c in description.components}


def _motion_target(description: ModelDescription, parsed: Mapping[str, ParsedComponent]) -> str:
    unet = description.first_with_role("unet")
    if unet is None:
        raise ModelSourceError(f"{description.name} has no UNet to take a motion adapter")
    kind = parsed[unet.name].kind
    if not kind.takes_motion_adapter:
        raise ModelSourceError(f"this model's UNet is a {kind.class_name}, which takes no motion adapter "
                               "(a UNet3D is already a video UNet)")
    return unet.name


def native_weights(networks: Networks, expected: Mapping[str, tuple[int, ...]],
                   parts: list[tuple[Mapping[str, Any], str]], source: str, model_name: str) -> dict[str, Any]:
    """Weights from several files (``(state, layout)`` each, keys already mapped) in the backend's layout,
    refused unless together they hold exactly the expected names and shapes."""
    union = {k: v for state, _ in parts for k, v in state.items()}
    check_names(expected, union, source, model_name)
    out = {k: networks.to_native(v, expected[k], layout) for state, layout in parts for k, v in state.items()}
    check_shapes(out, expected, source, original=union)
    return out


def read_diffusers_state(networks: Networks, files: list[Path], kind: ModuleKind) -> dict[str, Any]:
    """A diffusers component's tensors (all shards) under our parameter names, in PyTorch layout."""
    state: dict[str, Any] = {}
    for f in files:
        state.update(networks.read(f))
    return map_keys(state, kind.rules)


def read_component_files(networks: Networks, files: ComponentFiles, kind: ModuleKind) -> dict[str, Any]:
    """A component stored elsewhere (a part of a single-file checkpoint, a VAE file) under our parameter
    names, in PyTorch layout: only the tensors its key map names are read."""
    if files.key_map is None:
        return read_diffusers_state(networks, list(files.files), kind)
    wanted = {key for key, _ in files.key_map.values()}
    state: dict[str, Any] = {}
    for f in files.files:
        state.update(networks.read_keys(f, wanted))
    return map_keys(take(state, files.key_map, ", ".join(map(str, files.files))), kind.rules)


def cache_key(source: ModelSource, dtype: str, variant: str | None, description: ModelDescription = STABLE_DIFFUSION,
              files: Mapping[str, list[Path]] | None = None) -> str:
    """Identity of the exact weight and config files (path, size, mtime) plus dtype and converter version."""
    h = hashlib.sha256()
    h.update(f"{__version__}|{fmt.FORMAT_VERSION}|{dtype}|{variant}".encode())
    for c in description.components:
        paths = files[c.name] if files is not None else source_weight_files(source, c, variant)
        for f in list(paths) + [source.config_path(c)]:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        if c.name in source.overrides:
            h.update(f"|{c.name}:{source.overrides[c.name].fingerprint}".encode())
    return h.hexdigest()[:24]


def source_weight_files(source: ModelSource, component: Component, variant: str | None) -> list[Path]:
    """The files ``component``'s weights are read from (its override's, else the folder's best)."""
    override = source.overrides.get(component.name)
    return list(override.files) if override is not None else weight_files(source.root, component, variant)


def write_converted(destination: Path, source: ModelSource, description: ModelDescription,
                    parsed: Mapping[str, ParsedComponent], weights: Mapping[str, Mapping[str, Any]], dtype: str,
                    variant: str | None, networks: Networks, overwrite: bool = False) -> Path:
    """A converted folder (see ``converted_format``) from converted ``weights`` and the configs already
    read, assembled under a temporary name and renamed into place when complete."""
    root = source.root
    with atomic_directory(destination, overwrite=overwrite) as tmp:
        for rel in description.support_files:
            if (root / rel).is_file():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, tmp / rel)
        for folder in dict.fromkeys(description.tokenizers.values()):
            if (root / folder).is_dir():
                shutil.copytree(root / folder, tmp / folder, dirs_exist_ok=True)
        for c in description.components:
            write_json(tmp / c.folder / "config.json", parsed[c.name].raw_config)
            networks.save(fmt.weights_path(tmp, c.folder), weights[c.name], {"format": "mlx", "component": c.name})
        write_json(tmp / fmt.MANIFEST_NAME, fmt.manifest(
            source=source.origin, dtype=dtype, components=description.names, converter_version=__version__,
            source_files={c.name: (source_weight_files(source, c, variant)[0].name if c.name in source.overrides
                                   else local_weight_file(root, c, variant).name) for c in description.components}))
    return Path(destination)


@dataclass(frozen=True)
class WeightSource:
    """Where one load reads its weights: a converted folder, or a diffusers folder's files (and, for a
    backend in the converted layout with the cache on, the cache folder to convert them into)."""

    converted: Path | None
    files: dict[str, list[Path]]
    cache_to: Path | None = None

    def read(self, networks: Networks, source: ModelSource, p: ParsedComponent) -> tuple[dict[str, Any], str, str]:
        """One component's tensors under our names: (state, its layout, a label for errors)."""
        override = source.overrides.get(p.component.name)
        if override is not None and (self.converted is None or source.kind == "mlx"):
            label = ", ".join(map(str, override.files)) + f" ({p.component.name})"
            return read_component_files(networks, override, p.kind), DIFFUSERS_LAYOUT, label
        if self.converted is not None:
            path = fmt.weights_path(self.converted, p.component.folder)
            return networks.read(path), fmt.LAYOUT, str(path.parent)
        state = read_diffusers_state(networks, self.files[p.component.name], p.kind)
        return state, DIFFUSERS_LAYOUT, str(source.root / p.component.folder)


def weight_source(source: ModelSource, networks: Networks, description: ModelDescription, dtype: str,
                  variant: str | None, use_cache: bool) -> WeightSource:
    if source.kind == "mlx":
        where = WeightSource(source.root, {})
    else:
        files = {c.name: source_weight_files(source, c, variant) for c in description.components}
        target = None
        if use_cache and networks.caches_conversion:
            target = cache_root() / "converted" / cache_key(source, dtype, variant, description, files)
        where = WeightSource(target, files) if target is not None and fmt.is_converted(target) \
            else WeightSource(None, files, target)
    if where.converted is not None:
        fmt.check_components(where.converted, fmt.read_manifest(where.converted), description.names)
    return where


def convert_model(source: ModelSource, destination: str | Path, networks: Networks, *, dtype: str = "float16",
                  variant: str | None = None, overwrite: bool = False,
                  description: ModelDescription = STABLE_DIFFUSION) -> Path:
    """Convert a diffusers model to a converted folder in ``networks``' layout (MLX)."""
    if source.kind == "mlx":
        raise ValueError(f"{source.origin} is already a converted MLX model")
    if not networks.caches_conversion:
        raise ValueError(f"the {networks.name} backend reads diffusers folders directly and writes no converted ones")
    check_dtype(dtype)
    parsed = parse_components(source.root, description, source.overrides)
    where = weight_source(source, networks, description, dtype, variant, use_cache=False)
    weights = {}
    for name, p in parsed.items():
        module = networks.build(p.kind, p.config)
        state, layout, label = where.read(networks, source, p)
        native = native_weights(networks, networks.parameter_shapes(module), [(state, layout)], label,
                                p.kind.class_name)
        weights[name] = {k: networks.cast(v, dtype) for k, v in native.items()}
    return write_converted(Path(destination), source, description, parsed, weights, dtype, variant, networks, overwrite)


def load_model(source: ModelSource, networks: Networks, dtype: str = "float32", *, variant: str | None = None,
               use_cache: bool = True, motion_adapter: MotionAdapterSource | None = None,
               description: ModelDescription = STABLE_DIFFUSION) -> LoadedModel:
    """Every component of ``source`` as ``networks`` modules with strict weights, each built once.

    dtypes follow each component's policy (an fp16 SD VAE stays fp32). With ``motion_adapter`` the UNet
    is a motion UNet: the model's weights plus the adapter's. A diffusers model loaded by a backend in
    the converted layout is converted into the cache on first use (``use_cache``): the weights converted
    for the cache are the ones assigned, and later loads read the cache.
    """
    check_dtype(dtype)
    parsed = parse_components(source.root, description, source.overrides)
    dtypes = {n: p.component.dtype_policy(p.config, dtype) for n, p in parsed.items()}
    motion_weights, motion_config, motion_into = {}, None, None
    if motion_adapter is not None:
        motion_into = _motion_target(description, parsed)
        motion_weights, motion_config = motion_state(motion_adapter, networks.read)
    where = weight_source(source, networks, description, dtype, variant, use_cache)

    built, for_cache = {}, {}
    for name, p in parsed.items():
        motion = name == motion_into
        module = networks.build(p.kind, p.config, **({"motion": motion_config} if motion else {}))
        state, layout, label = where.read(networks, source, p)
        parts = [(state, layout)] + ([(motion_weights, DIFFUSERS_LAYOUT)] if motion else [])
        label += f" + {motion_adapter.origin}" if motion else ""
        weights = native_weights(networks, networks.parameter_shapes(module), parts, label, p.kind.class_name)
        if where.cache_to is not None:  # in the load dtype, as the next load will read them from the cache
            for_cache[name] = {k: networks.cast(weights[k], dtype) for k in state}
            weights.update(for_cache[name])
        built[name] = (module, weights)

    converted = where.converted
    if where.cache_to is not None:
        try:
            converted = write_converted(where.cache_to, source, description, parsed, for_cache, dtype, variant,
                                        networks, overwrite=True)
        except OSError as e:  # a read-only or full cache must not stop loading
            warnings.warn(f"could not cache the converted model in {where.cache_to} ({e}); loading from the source",
                          stacklevel=3)
    weights_files = {} if converted is None else {n: fmt.weights_path(converted, p.component.folder)
                                                   for n, p in parsed.items()}
    modules = {n: networks.assign(m, w, dtypes[n]) for n, (m, w) in built.items()}
    return LoadedModel(description, parsed, modules, dtypes, motion_config, weights_files)


def load_network(root: str | Path, name: str, networks: Networks, *, variant: str | None = None,
                 dtype: str = "float32", description: ModelDescription = STABLE_DIFFUSION,
                 files: ComponentFiles | None = None) -> Any:
    """One component of a diffusers folder as a module with strict weights (``root`` may hold only it);
    ``files``: its config and weights stored elsewhere (a single file through its key map)."""
    p = parse_component(Path(root), description.component(name), None if files is None else files.config)
    module = networks.build(p.kind, p.config)
    if files is None:
        state = read_diffusers_state(networks, weight_files(Path(root), p.component, variant), p.kind)
        label = str(Path(root) / p.component.folder)
    else:
        state, label = read_component_files(networks, files, p.kind), ", ".join(map(str, files.files))
    weights = native_weights(networks, networks.parameter_shapes(module), [(state, DIFFUSERS_LAYOUT)],
                             label, p.kind.class_name)
    return networks.assign(module, weights, dtype)
