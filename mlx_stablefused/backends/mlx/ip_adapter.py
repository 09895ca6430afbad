"""IP-Adapter in MLX: diffusers' ImageProjection, the decoupled cross-attention's key/value projections
attached to the UNet's attn2 layers, and the image encoder run on preprocessed pixels."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ...ip_adapter import ImageProjectionSpec, IPAdapterWeights, ResamplerSpec
from ...weights import check_names, check_shapes
from .cpu_math import attention, gelu


class ImageProjection(nn.Module):
    """diffusers' ImageProjection: (B, image_embed_dim) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, spec: ImageProjectionSpec) -> None:
        super().__init__()
        self.image_embeds = nn.Linear(spec.image_embed_dim, spec.num_tokens * spec.cross_attention_dim)
        self.norm = nn.LayerNorm(spec.cross_attention_dim)
        self._tokens, self._width = spec.num_tokens, spec.cross_attention_dim

    def __call__(self, embeds: mx.array) -> mx.array:
        return self.norm(self.image_embeds(embeds).reshape(embeds.shape[0], self._tokens, self._width))


class PlusAttention(nn.Module):
    """The resampler's attention (diffusers' Attention names, no biases): queries from the latents, keys and
    values from the image features and the latents together."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, dim, bias=False)]
        self._heads, self._dim_head = heads, dim_head

    def __call__(self, latents: mx.array, context: mx.array) -> mx.array:
        b, lq, _ = latents.shape
        h, d = self._heads, self._dim_head

        def split(x: mx.array) -> mx.array:
            return x.reshape(b, x.shape[1], h, d).transpose(0, 2, 1, 3)

        o = attention(split(self.to_q(latents)), split(self.to_k(context)), split(self.to_v(context)), d**-0.5, None)
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(b, lq, h * d))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(self.proj(x))


class PlusFeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu", bias=False); net.1 is its Dropout, kept for the names."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.net = [GELUProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim, bias=False)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class PlusBlock(nn.Module):
    """diffusers' IPAdapterPlusImageProjectionBlock."""

    def __init__(self, spec: ResamplerSpec) -> None:
        super().__init__()
        dim = spec.hidden_dims
        self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = PlusAttention(dim, spec.heads, spec.dim_head)
        self.ff = [nn.LayerNorm(dim), PlusFeedForward(dim, spec.ff_inner)]

    def __call__(self, x: mx.array, latents: mx.array) -> mx.array:
        queries = self.ln1(latents)
        latents = self.attn(queries, mx.concatenate([self.ln0(x), queries], axis=1)) + latents
        return self.ff[1](self.ff[0](latents)) + latents


class Resampler(nn.Module):
    """diffusers' IPAdapterPlusImageProjection: (B, L, encoder hidden) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, spec: ResamplerSpec) -> None:
        super().__init__()
        self.latents = mx.zeros((1, spec.num_tokens, spec.hidden_dims))
        self.proj_in = nn.Linear(spec.image_embed_dim, spec.hidden_dims)
        self.proj_out = nn.Linear(spec.hidden_dims, spec.cross_attention_dim)
        self.norm_out = nn.LayerNorm(spec.cross_attention_dim)
        self.layers = [PlusBlock(spec) for _ in range(spec.depth)]

    def __call__(self, states: mx.array) -> mx.array:
        x = self.proj_in(states)
        latents = mx.broadcast_to(self.latents, (states.shape[0], *self.latents.shape[1:]))
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))


PROJECTIONS = {ImageProjectionSpec: ImageProjection, ResamplerSpec: Resampler}


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
        self.projection: ImageProjection | Resampler | None = None
        self.hidden_states = False  # whether the projection takes the encoder's penultimate hidden states (Plus)
        self.paths: list[str] = []

    def load_image_encoder(self, folder: Any) -> Any:
        from ...model_description import IMAGE_ENCODER

        return self.backend.load_network(folder, "image_encoder", IMAGE_ENCODER)

    def attach(self, adapter: IPAdapterWeights) -> None:
        dtype = self.backend.dtype
        spec = adapter.projection
        module = PROJECTIONS[type(spec)](spec)
        self.projection = assign(module, adapter.image_proj, dtype, adapter.origin, type(module).__name__)
        self.hidden_states = spec.hidden_states
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
        """(N, 3, S, S) pixel values (transformers' layout) -> (N, projection_dim) image embeddings, or for
        Plus the penultimate hidden states (N, patches + 1, hidden)."""
        dtype = encoder.visual_projection.weight.dtype
        x = mx.array(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))).astype(dtype)
        if self.hidden_states:
            out = encoder(x, output_hidden_states=True).hidden_states[-2]
        else:
            out = encoder(x).image_embeds
        mx.eval(out)
        return out

    def project(self, embeds: mx.array) -> mx.array:
        """(B, n, D) image embeddings (n images per sample; Plus: (B, n, L, D) hidden states) ->
        (B, n x tokens, cross_attention_dim)."""
        b, n = embeds.shape[:2]
        tokens = self.projection(embeds.reshape(b * n, *embeds.shape[2:]).astype(self.backend.dtype))
        tokens = tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])
        mx.eval(tokens)
        return tokens
