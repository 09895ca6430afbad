"""IP-Adapter in PyTorch: diffusers' ImageProjection, the decoupled cross-attention's key/value projections
attached to the UNet's attn2 layers, and the image encoder run on preprocessed pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ip_adapter import ImageProjectionSpec, IPAdapterWeights, ResamplerSpec
from ...weights import check_names, check_shapes
from .layers import attend


class ImageProjection(nn.Module):
    """diffusers' ImageProjection: (B, image_embed_dim) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, spec: ImageProjectionSpec) -> None:
        super().__init__()
        self.image_embeds = nn.Linear(spec.image_embed_dim, spec.num_tokens * spec.cross_attention_dim)
        self.norm = nn.LayerNorm(spec.cross_attention_dim)
        self.tokens, self.width = spec.num_tokens, spec.cross_attention_dim

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.image_embeds(embeds).reshape(embeds.shape[0], self.tokens, self.width))


class PlusAttention(nn.Module):
    """The resampler's attention (diffusers' Attention names, no biases): queries from the latents, keys and
    values from the image features and the latents together."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.heads, self.dim_head = heads, dim_head

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, lq, _ = latents.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, self.heads, self.dim_head).transpose(1, 2)

        o = attend(split(self.to_q(latents)), split(self.to_k(context)), split(self.to_v(context)), None)
        return self.to_out[0](o.transpose(1, 2).reshape(b, lq, self.heads * self.dim_head))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class PlusFeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu", bias=False); net.1 is its Dropout, kept for the names."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class PlusBlock(nn.Module):
    """diffusers' IPAdapterPlusImageProjectionBlock."""

    def __init__(self, spec: ResamplerSpec) -> None:
        super().__init__()
        dim = spec.hidden_dims
        self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = PlusAttention(dim, spec.heads, spec.dim_head)
        self.ff = nn.Sequential(nn.LayerNorm(dim), PlusFeedForward(dim, spec.ff_inner))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        queries = self.ln1(latents)
        latents = self.attn(queries, torch.cat([self.ln0(x), queries], dim=1)) + latents
        return self.ff(latents) + latents


class Resampler(nn.Module):
    """diffusers' IPAdapterPlusImageProjection: (B, L, encoder hidden) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, spec: ResamplerSpec) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, spec.num_tokens, spec.hidden_dims))
        self.proj_in = nn.Linear(spec.image_embed_dim, spec.hidden_dims)
        self.proj_out = nn.Linear(spec.hidden_dims, spec.cross_attention_dim)
        self.norm_out = nn.LayerNorm(spec.cross_attention_dim)
        self.layers = nn.ModuleList([PlusBlock(spec) for _ in range(spec.depth)])

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(states)
        latents = self.latents.expand(states.shape[0], -1, -1)
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
        self.heads, self.head_dim = heads, head_dim
        self.scale = 1.0

    def attend(self, q: torch.Tensor, tokens: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """``scale`` x attention of the queries (B, heads, Lq, d) over the image tokens (B, T, D)."""
        b = tokens.shape[0]
        k = self.to_k_ip(tokens).view(b, -1, self.heads, self.head_dim).transpose(1, 2).to(q.dtype)
        v = self.to_v_ip(tokens).view(b, -1, self.heads, self.head_dim).transpose(1, 2).to(q.dtype)
        return attend(q, k, v, chunk) * self.scale


def assign(module: nn.Module, weights: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype,
           origin: str, name: str) -> nn.Module:
    """Strictly checked weights (names and shapes) into ``module``, on ``device`` in ``dtype``."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_names(shapes, weights, origin, name)
    check_shapes(weights, shapes, origin)
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class TorchIPAdapterHost:
    """How an IP-Adapter lives on the torch backend's networks."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.projection: ImageProjection | Resampler | None = None
        self.hidden_states = False  # whether the projection takes the encoder's penultimate hidden states (Plus)
        self.paths: list[str] = []

    def load_image_encoder(self, folder: Any) -> Any:
        from ...model_description import IMAGE_ENCODER

        return self.backend.load_network(folder, "image_encoder", IMAGE_ENCODER)

    def attach(self, adapter: IPAdapterWeights) -> None:
        b = self.backend
        spec = adapter.projection
        module = PROJECTIONS[type(spec)](spec)
        self.projection = assign(module, adapter.image_proj, b.device, b.dtype, adapter.origin, type(module).__name__)
        self.hidden_states = spec.hidden_states
        for path, (k, v) in adapter.layers.items():
            attn = b.unet_model.get_submodule(path)
            layers = IPAdapterLayers(spec.cross_attention_dim, k.shape[0], attn.heads, attn.dim_head)
            attn.ip_adapter = assign(layers, {"to_k_ip.weight": k, "to_v_ip.weight": v}, b.device, b.dtype,
                                     adapter.origin, path)
        self.paths = list(adapter.layers)

    def detach(self) -> None:
        for path in self.paths:
            attn = self.backend.unet_model.get_submodule(path)
            attn.ip_adapter = None
        self.paths, self.projection = [], None

    def set_scale(self, scale: float) -> None:
        for path in self.paths:
            self.backend.unet_model.get_submodule(path).ip_adapter.scale = float(scale)

    @torch.inference_mode()
    def encode_images(self, encoder: Any, pixels: np.ndarray) -> torch.Tensor:
        """(N, 3, S, S) pixel values -> (N, projection_dim) image embeddings, or for Plus the penultimate
        hidden states (N, patches + 1, hidden)."""
        dtype = encoder.visual_projection.weight.dtype
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.backend.device, dtype)
        if self.hidden_states:
            return encoder(x, output_hidden_states=True).hidden_states[-2]
        return encoder(x).image_embeds

    @torch.inference_mode()
    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, n, D) image embeddings (n images per sample; Plus: (B, n, L, D) hidden states) ->
        (B, n x tokens, cross_attention_dim)."""
        b, n = embeds.shape[:2]
        tokens = self.projection(embeds.reshape(b * n, *embeds.shape[2:]).to(self.backend.device, self.backend.dtype))
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])
