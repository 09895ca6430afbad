"""IP-Adapter in PyTorch: diffusers' ImageProjection, the decoupled cross-attention's key/value projections
attached to the UNet's attn2 layers, and the image encoder run on preprocessed pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ...ip_adapter import ImageProjectionSpec, IPAdapterWeights
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
        self.projection: ImageProjection | None = None
        self.paths: list[str] = []

    def load_image_encoder(self, folder: Any) -> Any:
        from ...model_description import IMAGE_ENCODER

        return self.backend.load_network(folder, "image_encoder", IMAGE_ENCODER)

    def attach(self, adapter: IPAdapterWeights) -> None:
        b = self.backend
        spec = adapter.projection
        self.projection = assign(ImageProjection(spec), adapter.image_proj, b.device, b.dtype, adapter.origin,
                                 "an ImageProjection")
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
        """(N, 3, S, S) pixel values -> (N, projection_dim) image embeddings."""
        dtype = encoder.visual_projection.weight.dtype
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.backend.device, dtype)
        return encoder(x).image_embeds

    @torch.inference_mode()
    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, n, D) image embeddings (n images per sample) -> (B, n x tokens, cross_attention_dim)."""
        b, n = embeds.shape[:2]
        tokens = self.projection(embeds.reshape(b * n, -1).to(self.backend.device, self.backend.dtype))
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])
