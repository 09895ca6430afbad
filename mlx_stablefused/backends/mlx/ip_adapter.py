"""IP-Adapter in MLX: diffusers' ImageProjection, the decoupled cross-attention's key/value projections
attached to the UNet's attn2 layers, and the image encoder run on preprocessed pixels."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ...ip_adapter import ImageProjectionSpec, IPAdapterWeights
from ...weights import check_names, check_shapes
from .cpu_math import attention


class ImageProjection(nn.Module):
    """diffusers' ImageProjection: (B, image_embed_dim) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, spec: ImageProjectionSpec) -> None:
        super().__init__()
        self.image_embeds = nn.Linear(spec.image_embed_dim, spec.num_tokens * spec.cross_attention_dim)
        self.norm = nn.LayerNorm(spec.cross_attention_dim)
        self._tokens, self._width = spec.num_tokens, spec.cross_attention_dim

    def __call__(self, embeds: mx.array) -> mx.array:
        return self.norm(self.image_embeds(embeds).reshape(embeds.shape[0], self._tokens, self._width))


class IPAdapterLayers(nn.Module):
    """The keys and values an attn2 computes from the image tokens (diffusers' IPAdapterAttnProcessor
    ``to_k_ip`` / ``to_v_ip``): its output becomes text attention + ``scale`` x image attention."""

    def __init__(self, cross_attention_dim: int, inner: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner, bias=False)
        self._heads, self._head_dim = heads, head_dim
        self.scale = 1.0

    def attend(self, q: mx.array, tokens: mx.array, sdpa_scale: float, chunk: int | None) -> mx.array:
        """``scale`` x attention of the queries (B, heads, Lq, d) over the image tokens (B, T, D)."""
        b, t, _ = tokens.shape
        h, d = self._heads, self._head_dim
        k = self.to_k_ip(tokens).reshape(b, t, h, d).transpose(0, 2, 1, 3).astype(q.dtype)
        v = self.to_v_ip(tokens).reshape(b, t, h, d).transpose(0, 2, 1, 3).astype(q.dtype)
        return attention(q, k, v, sdpa_scale, chunk) * self.scale


def module_at(root: nn.Module, path: str) -> Any:
    """The submodule at a dotted, diffusers-style path (list items by index)."""
    node: Any = root
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def assign(module: nn.Module, weights: dict[str, np.ndarray], dtype: mx.Dtype, origin: str, name: str) -> nn.Module:
    """Strictly checked weights (names and shapes) into ``module``, in ``dtype``."""
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}
    check_names(shapes, weights, origin, name)
    check_shapes(weights, shapes, origin)
    module.update(tree_unflatten([(k, mx.array(v).astype(dtype)) for k, v in weights.items()]))
    mx.eval(module.parameters())
    return module.eval()


class MLXIPAdapterHost:
    """How an IP-Adapter lives on the MLX backend's networks."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.projection: ImageProjection | None = None
        self.paths: list[str] = []

    def load_image_encoder(self, folder: Any) -> Any:
        from ...model_description import IMAGE_ENCODER

        return self.backend.load_network(folder, "image_encoder", IMAGE_ENCODER)

    def attach(self, adapter: IPAdapterWeights) -> None:
        dtype = self.backend.dtype
        spec = adapter.projection
        self.projection = assign(ImageProjection(spec), adapter.image_proj, dtype, adapter.origin, "an ImageProjection")
        unet = self.backend.unet_model
        for path, (k, v) in adapter.layers.items():
            attn = module_at(unet, path)
            layers = IPAdapterLayers(spec.cross_attention_dim, k.shape[0], attn._heads, attn._dim_head)
            attn.ip_adapter = assign(layers, {"to_k_ip.weight": k, "to_v_ip.weight": v}, dtype, adapter.origin, path)
        self.paths = list(adapter.layers)
        self.backend.unet_changed()

    def detach(self) -> None:
        unet = self.backend.unet_model
        for path in self.paths:
            attn = module_at(unet, path)
            if "ip_adapter" in attn:
                del attn["ip_adapter"]
        self.paths, self.projection = [], None
        self.backend.unet_changed()

    def set_scale(self, scale: float) -> None:
        for path in self.paths:
            module_at(self.backend.unet_model, path).ip_adapter.scale = float(scale)
        self.backend.unet_changed()  # a compiled step holds the scale as a constant

    def encode_images(self, encoder: Any, pixels: np.ndarray) -> mx.array:
        """(N, 3, S, S) pixel values (transformers' layout) -> (N, projection_dim) image embeddings."""
        dtype = encoder.visual_projection.weight.dtype
        out = encoder(mx.array(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))).astype(dtype)).image_embeds
        mx.eval(out)
        return out

    def project(self, embeds: mx.array) -> mx.array:
        """(B, n, D) image embeddings (n images per sample) -> (B, n x tokens, cross_attention_dim)."""
        b, n = embeds.shape[:2]
        tokens = self.projection(embeds.reshape(b * n, -1).astype(self.backend.dtype))
        tokens = tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])
        mx.eval(tokens)
        return tokens
