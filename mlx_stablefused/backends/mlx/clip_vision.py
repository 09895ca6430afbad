"""CLIP's image encoder (transformers' CLIPVisionModelWithProjection) in MLX, with transformers' parameter
names: an IP-Adapter's ``image_encoder`` (ViT-H/14 for SD 1.5, ViT-bigG/14 for SDXL)."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ...config import CLIPVisionConfig
from .clip import CLIPEncoder


class CLIPVisionOutput(NamedTuple):
    image_embeds: mx.array  # (B, projection_dim): the class token, post-layernormed, through visual_projection
    last_hidden_state: mx.array  # (B, patches + 1, D)
    hidden_states: tuple[mx.array, ...] | None = None  # embeddings (after pre_layrnorm), then every layer's output


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = mx.zeros((d,))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, d)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, H, W, C) pixels -> (B, patches + 1, D): the class token, then the patches row by row."""
        patches = self.patch_embedding(pixels)
        b, d = patches.shape[0], patches.shape[-1]
        patches = patches.reshape(b, -1, d)
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (b, 1, d))
        return mx.concatenate([cls, patches], axis=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPVisionModelWithProjection(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, pixel_values: mx.array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """``pixel_values``: (B, image_size, image_size, C), normalised as CLIPImageProcessor does."""
        size = self.config.image_size
        if tuple(pixel_values.shape[1:3]) != (size, size):
            raise ValueError(f"the image encoder takes {size}x{size} images, got {tuple(pixel_values.shape[1:3])}")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        states = [x]
        for layer in vm.encoder.layers:
            x = layer(x)
            states.append(x)
        embeds = self.visual_projection(vm.post_layernorm(x[:, 0]))
        return CLIPVisionOutput(embeds, x, tuple(states) if output_hidden_states else None)
