"""Textual inversion: learned token embeddings added to the tokenizer and the text encoder.

``load_textual_inversion`` follows diffusers' ``TextualInversionLoaderMixin.load_textual_inversion``
(names, keywords, checks, token numbering): a source is a file, a folder, a hub repo id (with
``weight_name``), a ``{token: vector}`` dict or an array; lists load several at once. File formats:

* diffusers ``learned_embeds.safetensors`` / ``learned_embeds.bin``: one entry ``{token: (D,) or (n, D)}``;
* AUTOMATIC1111 ``.pt``: ``string_to_param`` ``{'*': (n, D)}`` and its ``name`` (the default token);
* AUTOMATIC1111-style ``.safetensors``: ``emb_params`` ``(n, D)`` (the default token is the file name, as
  AUTOMATIC1111 names embeddings; diffusers would take the key ``emb_params`` as the token).

Pickles are read with the weights-only reader (nothing in the file is executed). An embedding of
n vectors becomes tokens ``tok``, ``tok_1`` ... ``tok_{n-1}`` and ``tok`` in a prompt stands for all
of them, as in diffusers. Everything is checked before anything is added: a load adds all or nothing.

SDXL (AUTOMATIC1111 / civitai SDXL embeddings): one file holds ``clip_l`` (n, 768) and ``clip_g`` (n, 1280),
one tensor per text encoder; the same tokens go into both tokenizers and each encoder gets its own vectors,
as diffusers' documented recipe does with two ``load_textual_inversion`` calls (a refiner takes ``clip_g``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, load_pickle_object, load_weights
from .errors import ModelSourceError, WeightLoadError

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")  # diffusers' TEXT_INVERSION_NAME(_SAFE)
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # text encoder -> its tensor in an SDXL embedding

Source = Any  # a path, a hub repo id, a {token: vector} mapping, or an array


@dataclass(frozen=True)
class Embedding:
    """One loaded embedding: its token, its vectors (n, D) float32, and where it came from."""

    token: str
    vectors: np.ndarray
    origin: str


def _as_float32(value: Any) -> np.ndarray:
    """A torch tensor, MLX array or numpy array as float32 numpy (bf16 included)."""
    if hasattr(value, "detach"):  # torch
        return value.detach().float().cpu().numpy()
    if type(value).__module__.startswith("mlx"):
        import mlx.core as mx

        return np.asarray(value.astype(mx.float32))
    return np.asarray(value, dtype=np.float32)


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def embedding_from_state(state: Any, token: str | None, origin: str, default_name: str | None = None) -> Embedding:
    """The token and vectors of one loaded file or object, by its format (see the module docstring)."""
    if _is_array(state):
        if token is None:
            raise ValueError(f"{origin} is a bare tensor; pass the token it stands for (token=...)")
        name, vectors = token, state
    elif isinstance(state, Mapping) and "string_to_param" in state:  # AUTOMATIC1111 .pt
        params = state["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise WeightLoadError(f"{origin}: string_to_param has no '*' entry (keys: {list(params)[:5]})")
        name, vectors = state.get("name", default_name), params["*"]
    elif isinstance(state, Mapping) and "emb_params" in state:  # AUTOMATIC1111-style .safetensors
        name, vectors = default_name, state["emb_params"]
    elif isinstance(state, Mapping) and {"clip_l", "clip_g"} & set(state):
        raise WeightLoadError(f"{origin} is an SDXL embedding (clip_l / clip_g vectors for two text encoders); "
                              "this model has one text encoder")
    elif isinstance(state, Mapping) and len(state) == 1:  # diffusers {token: vector}
        name, vectors = next(iter(state.items()))
    else:
        keys = sorted(map(str, state))[:8] if isinstance(state, Mapping) else type(state).__name__
        raise WeightLoadError(f"{origin} is not a textual-inversion embedding: expected one {{token: vector}} entry "
                              f"(diffusers), string_to_param (AUTOMATIC1111 .pt) or emb_params; found {keys}")
    if not _is_array(vectors):
        raise WeightLoadError(f"{origin}: the embedding is a {type(vectors).__name__}, not a tensor")
    array = _as_float32(vectors)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] < 1:
        raise WeightLoadError(f"{origin}: embedding of shape {tuple(array.shape)}; expected (D,) or (vectors, D)")
    if not np.isfinite(array).all():
        raise WeightLoadError(f"{origin}: the embedding holds NaN or infinite values")
    name = token if token is not None else name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{origin} names no token; pass token=...")
    return Embedding(name, np.ascontiguousarray(array), origin)


def read_embedding_file(path: Path) -> Any:
    """The contents of an embedding file: safetensors validated, pickles through the weights-only reader."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return load_weights(path)
    if path.suffix in PICKLE_SUFFIXES:
        return load_pickle_object(path)
    raise WeightLoadError(f"{path}: unknown embedding format {path.suffix!r} (expected .safetensors, .pt or .bin)")


def locate(source: str | Path, weight_name: str | None = None, subfolder: str | None = None,
           local_files_only: bool = False, revision: str | None = None) -> Path:
    """The embedding file for a path, a folder (diffusers' file names, or ``weight_name``) or a hub repo id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    names = (weight_name,) if weight_name else DIFFUSERS_NAMES
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        for name in names:
            if (folder / name).is_file():
                return folder / name
        raise ModelSourceError(f"no textual-inversion file in {folder} (looked for {', '.join(names)})")
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelSourceError(f"textual-inversion source {text!r} does not exist (and is not a hub repo id)")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in names:
        try:
            return Path(hf_hub_download(text, name, subfolder=subfolder, revision=revision,
                                        local_files_only=local_files_only))
        except Exception as e:  # not found, offline, network: try the next name, then report all
            errors.append(f"{name}: {type(e).__name__}")
    raise ModelSourceError(f"could not get a textual-inversion file from hub repo {text!r} ({'; '.join(errors)}); "
                           "pass weight_name= for another file name, or a local path")


def read_source(source: Source, **locate_options: Any) -> tuple[Any, str, str | None]:
    """A source's contents, where it came from, and its default token (a file's name)."""
    if isinstance(source, Mapping) or _is_array(source):
        return source, "the embedding passed", None
    if not isinstance(source, (str, Path)):
        raise TypeError(f"a textual-inversion source is a path, hub repo id, dict or tensor, got {type(source).__name__}")
    path = locate(source, **locate_options)
    return read_embedding_file(path), str(path), path.stem


def load_embedding(source: Source, token: str | None, **locate_options: Any) -> Embedding:
    """One source -> its ``Embedding`` (the file read, its format recognised, its token chosen)."""
    state, origin, default_name = read_source(source, **locate_options)
    return embedding_from_state(state, token, origin=origin, default_name=default_name)


def sdxl_embeddings(source: Source, token: str | None, encoders: Sequence[str],
                    **locate_options: Any) -> dict[str, Embedding]:
    """One SDXL embedding -> {text encoder: its Embedding}, the same token and vector count for each."""
    state, origin, default_name = read_source(source, **locate_options)
    wanted = {name: SDXL_KEYS[name] for name in encoders}
    if not isinstance(state, Mapping) or not set(wanted.values()) <= set(state):
        found = sorted(map(str, state))[:8] if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise WeightLoadError(f"{origin} is not an SDXL embedding: SDXL models need "
                              f"{' and '.join(repr(k) for k in wanted.values())} vectors (one tensor per text encoder, "
                              f"as AUTOMATIC1111 / civitai SDXL embeddings hold them); found {found} (an embedding "
                              "for a one-encoder SD 1.x/2.x model?)")
    out = {name: embedding_from_state(state[key], token or default_name, f"{origin} [{key}]")
           for name, key in wanted.items()}
    counts = {SDXL_KEYS[name]: len(e.vectors) for name, e in out.items()}
    if len(set(counts.values())) > 1:
        raise WeightLoadError(f"{origin}: the encoders' vector counts differ ({counts}); each token needs one "
                              "vector per text encoder")
    return out


def expand_vectors(embeddings: Sequence[Embedding]) -> tuple[list[str], np.ndarray]:
    """Tokens ``tok, tok_1, ...`` (one per vector, diffusers' naming) and the stacked vectors."""
    tokens = [t for e in embeddings for t in [e.token] + [f"{e.token}_{i}" for i in range(1, len(e.vectors))]]
    return tokens, np.concatenate([e.vectors for e in embeddings]).astype(np.float32)


def check_embeddings(embeddings: Sequence[Embedding], tokenizer: Any, width: int) -> None:
    """diffusers' refusals (a token already known, duplicates) and the width check, before anything changes."""
    names = [e.token for e in embeddings]
    if len(set(names)) < len(names):
        raise ValueError(f"You have passed a list of tokens that contains duplicates: {names}")
    for e in embeddings:
        if e.token in tokenizer:
            raise ValueError(f"Token {e.token} already in tokenizer vocabulary. Please choose a different token name "
                             f"or remove {e.token} and embedding from the tokenizer and text encoder.")
        if f"{e.token}_1" in tokenizer:
            raise ValueError(f"Multi-vector Token {e.token} ({e.token}_1 ...) already in tokenizer vocabulary. "
                             "Please choose a different token name.")
        if e.vectors.shape[1] != width:
            raise ValueError(f"{e.origin}: the embedding for {e.token!r} is {e.vectors.shape[1]} wide, but this "
                             f"model's text encoder takes {width}-wide token embeddings (an embedding made for "
                             "another model?)")


def load_textual_inversion(tokenizer: Any, backend: Any, pretrained_model_name_or_path: Source | list,
                           token: str | list | None = None, tokenizers: Mapping[str, Any] | None = None,
                           **locate_options: Any) -> list[str]:
    """Load embeddings into ``tokenizer`` and ``backend``'s text encoder; returns the tokens added.
    ``tokenizers`` (text encoder -> its tokenizer): an SDXL model's, whose embeddings hold one tensor per encoder."""
    sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
        else [pretrained_model_name_or_path]
    tokens = token if isinstance(token, list) else [token]
    if tokens[0] is None:
        tokens = tokens * len(sources)
    if len(sources) == 1 and len(tokens) > 1 and _is_array(sources[0]):  # one tensor holding one row per token
        sources = list(sources[0])
    if len(sources) != len(tokens):
        raise ValueError(f"You have passed a list of models of length {len(sources)}, and list of tokens of length "
                         f"{len(tokens)} Make sure both lists have the same length.")
    if tokenizers is not None and "text_encoder_2" in tokenizers:
        return _load_per_encoder(backend, tokenizers, sources, tokens, locate_options)
    embeddings = [load_embedding(s, t, **locate_options) for s, t in zip(sources, tokens)]
    check_embeddings(embeddings, tokenizer, backend.token_embedding_width)
    names, vectors = expand_vectors(embeddings)
    first = len(tokenizer)
    backend.set_token_embeddings_from(first, vectors)
    try:
        tokenizer.add_tokens(names)
    except Exception:
        backend.set_token_embeddings_from(first, vectors[:0])
        raise
    return names


def _load_per_encoder(backend: Any, tokenizers: Mapping[str, Any], sources: list, tokens: list,
                      locate_options: Mapping[str, Any]) -> list[str]:
    """SDXL: every embedding's vectors into each text encoder and its tokenizer, all checked before any is added;
    a failure while adding takes back what was added."""
    per_source = [sdxl_embeddings(s, t, list(tokenizers), **locate_options) for s, t in zip(sources, tokens)]
    by_encoder = {name: [e[name] for e in per_source] for name in tokenizers}
    for name, embeddings in by_encoder.items():
        check_embeddings(embeddings, tokenizers[name], backend.token_embedding_width_of(name))
    done: list[tuple[str, int]] = []
    try:
        for name, embeddings in by_encoder.items():
            names, vectors = expand_vectors(embeddings)
            first = len(tokenizers[name])
            backend.set_token_embeddings_from(first, vectors, name)
            done.append((name, first))
            tokenizers[name].add_tokens(names)
    except Exception:
        for name, first in done:
            backend.set_token_embeddings_from(first, np.zeros((0, backend.token_embedding_width_of(name)), np.float32),
                                              name)
        raise
    return names
