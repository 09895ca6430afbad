"""Building blocks shared by the torch UNet and VAE, with diffusers' parameter names (NCHW tensors)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...topology import ResnetPlan


def group_norm(groups: int, channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) training timesteps, computed in float32."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    args = timesteps.float()[:, None] * torch.exp(exponent / (half - freq_shift))[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """SDPA over (B, heads, L, D), in query chunks of ``chunk`` when set (bounded score memory)."""
    if chunk and q.shape[2] > chunk:
        return torch.cat([F.scaled_dot_product_attention(q[:, :, s:s + chunk], k, v)
                          for s in range(0, q.shape[2], chunk)], dim=2)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True, upcast: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias)])
        self.heads, self.dim_head, self.upcast = heads, dim_head, upcast
        self.query_chunk: int | None = None
        self.ip_adapter: nn.Module | None = None  # an IP-Adapter's to_k_ip / to_v_ip (backends/torch/ip_adapter.py)

    def set_query_chunk(self, chunk: int | None) -> None:
        self.query_chunk = chunk

    def forward(self, x: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """``context`` may be (text, IP-Adapter image tokens): the attached ``ip_adapter`` adds its scaled
        attention over the image tokens."""
        context, image = context if isinstance(context, tuple) else (context, None)
        context = x if context is None else context
        b, lq, _ = x.shape
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, lq, h, d).transpose(1, 2)
        k = self.to_k(context).view(b, -1, h, d).transpose(1, 2)
        v = self.to_v(context).view(b, -1, h, d).transpose(1, 2)
        dtype = q.dtype
        if self.upcast and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        o = attend(q, k, v, self.query_chunk)
        if image is not None and self.ip_adapter.scale != 0:  # scale 0: exactly the text attention, as diffusers
            o = o + self.ip_adapter.attend(q, image, self.query_chunk)
        o = o.to(dtype)
        return self.to_out[0](o.transpose(1, 2).reshape(b, lq, h * d))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class ResnetBlock2D(nn.Module):
    def __init__(self, plan: ResnetPlan) -> None:
        super().__init__()
        in_channels, out_channels, temb_channels = plan.in_channels, plan.out_channels, plan.temb_channels
        groups, eps = plan.groups, plan.eps
        self.norm1 = group_norm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = group_norm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.asymmetric_pad = padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
