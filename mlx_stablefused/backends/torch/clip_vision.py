"""CLIP's image encoder (transformers' CLIPVisionModelWithProjection) in PyTorch, with transformers' parameter
names: an IP-Adapter's ``image_encoder`` (ViT-H/14 for SD 1.5, ViT-bigG/14 for SDXL)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ...config import CLIPVisionConfig
from .clip import CLIPEncoder


class CLIPVisionOutput(NamedTuple):
    image_embeds: torch.Tensor  # (B, projection_dim): the class token, post-layernormed, through visual_projection
    last_hidden_state: torch.Tensor  # (B, patches + 1, D)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings (after pre_layrnorm), then every layer's output


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, d)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, patches + 1, D): the class token, then the patches row by row."""
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


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

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """``pixel_values``: (B, C, image_size, image_size), normalised as CLIPImageProcessor does."""
        size = self.config.image_size
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(f"the image encoder takes {size}x{size} images, got {tuple(pixel_values.shape[2:])}")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        states = [x]
        for layer in vm.encoder.layers:
            x = layer(x)
            states.append(x)
        embeds = self.visual_projection(vm.post_layernorm(x[:, 0]))
        return CLIPVisionOutput(embeds, x, tuple(states) if output_hidden_states else None)
