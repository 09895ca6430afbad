"""CLIP text encoders (transformers' CLIPTextModel and CLIPTextModelWithProjection) in MLX, with
transformers' parameter names."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ...config import CLIPTextConfig
from .cpu_math import gelu, sigmoid_scaled


class CLIPOutput(NamedTuple):
    last_hidden_state: mx.array
    pooler_output: mx.array
    hidden_states: tuple[mx.array, ...] | None = None  # embeddings, then every layer's output (when asked)
    text_embeds: mx.array | None = None  # the pooled output through text_projection (WithProjection only)


def quick_gelu(x: mx.array) -> mx.array:
    return x * sigmoid_scaled(x, 1.702)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self._heads = heads
        self._mask = "causal" if causal else None  # text: causal; images: every patch sees every patch

    def __call__(self, x: mx.array) -> mx.array:
        b, n, d = x.shape
        h = self._heads
        q, k, v = (p(x).reshape(b, n, h, d // h).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=(d // h) ** -0.5, mask=self._mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self._act = quick_gelu if act == "quick_gelu" else gelu

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self._act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True) -> None:
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg, causal) for _ in range(cfg.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def __call__(self, input_ids: mx.array, output_hidden_states: bool = False) -> CLIPOutput:
        tm = self.text_model
        ids = mx.array(input_ids)
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens exceed the text encoder's "
                             f"{self.config.max_position_embeddings} positions")
        x = tm.embeddings(ids)
        states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            states.append(x)
        x = tm.final_layer_norm(x)
        # Pooled output at the first EOS (legacy configs with eos_token_id=2: at the highest id).
        if self.config.eos_token_id == 2:
            pos = mx.argmax(ids, axis=-1)
        else:
            pos = mx.argmax((ids == self.config.eos_token_id).astype(mx.int32), axis=-1)
        pooled = mx.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        return CLIPOutput(x, pooled, tuple(states) if output_hidden_states else None)


class CLIPTextModelWithProjection(CLIPTextModel):
    """SDXL's second text encoder (OpenCLIP bigG): ``text_embeds`` is the pooled EOS state through
    ``text_projection`` (no bias)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids: mx.array, output_hidden_states: bool = False) -> CLIPOutput:
        out = super().__call__(input_ids, output_hidden_states)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))
