"""The torch backend: the same pipelines on CUDA, MPS or CPU; tensors NCHW, as diffusers."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ...conditioning import Conditioning, as_conditioning
from ...model_description import STABLE_DIFFUSION, ModelDescription
from ...motion_adapters import MotionAdapterSource
from ...sources import ModelSource
from ..base import Backend
from .loading import TorchNetworks, load_model


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TorchBackend(Backend):
    name = "torch"
    native_output_type = "pt"

    def __init__(self, source: ModelSource, dtype: str = "float32", variant: str | None = None,
                 use_cache: bool = True, device: str | None = None,
                 motion_adapter: MotionAdapterSource | None = None,
                 description: ModelDescription = STABLE_DIFFUSION) -> None:
        self.device = torch.device(device) if device else best_device()
        self.dtype = TorchNetworks.native_dtype(dtype)
        if self.device.type == "cpu":
            from ..._malloc import keep_freed_memory

            keep_freed_memory()  # no page-fault churn between steps (see _malloc)
        loaded = load_model(source, TorchNetworks.dtype_name(self.dtype), self.device, variant=variant,
                            motion_adapter=motion_adapter, description=description)
        for name, value in loaded.backend_fields().items():  # text_encoder, unet_model, vae, their configs,
            setattr(self, name, value)  # components, configs (dicts by component name), description, motion_config
        self.vae_dtype = TorchNetworks.native_dtype(loaded.dtypes["vae"])  # fp32 for an fp16 force_upcast VAE, as diffusers
        if self.device.type == "cuda":
            self.unet_model.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode_text(self, token_ids: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64)).to(self.device)
        return self.text_encoder(ids).last_hidden_state

    def set_token_embeddings_from(self, first_id: int, vectors: np.ndarray, component: str = "text_encoder") -> None:
        embeddings = self.components[component].text_model.embeddings
        weight = embeddings.token_embedding.weight.detach()
        if first_id > weight.shape[0]:
            raise ValueError(f"token embedding rows end at {weight.shape[0]}; cannot replace from row {first_id}")
        added = torch.from_numpy(np.asarray(vectors, np.float32)).to(device=weight.device, dtype=weight.dtype)
        embeddings.token_embedding = torch.nn.Embedding.from_pretrained(torch.cat([weight[:first_id], added]))

    @torch.inference_mode()
    def encode_text_states(self, token_ids: np.ndarray, component: str = "text_encoder",
                           hidden_state: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64)).to(self.device)
        out = self.components[component](ids, output_hidden_states=True)
        pooled = out.pooler_output if out.text_embeds is None else out.text_embeds
        return out.hidden_states[hidden_state], pooled

    @torch.inference_mode()
    def unet(self, latent: torch.Tensor, timestep: float, conditioning: Conditioning | torch.Tensor) -> torch.Tensor:
        return self.in_unet_passes(self._unet_pass, latent, timestep, conditioning)

    def _unet_pass(self, latent: torch.Tensor, timestep: float, cond: Conditioning) -> torch.Tensor:
        t = torch.tensor([float(timestep)], dtype=torch.float32, device=self.device)
        if cond.image_channels is not None:
            latent = torch.cat([latent, cond.image_channels], dim=1)
        extra = self.unet_keywords(cond, lambda a: a.to(self.dtype))
        if latent.ndim == 5:  # videos (B, C, F, h, w): frames join the batch, frame-minor
            b, c, f, h, w = latent.shape
            extra = self.frames_into_batch(extra)
            x = latent.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(self.dtype)
            ctx = cond.text.to(self.dtype).repeat_interleave(f, dim=0)
            if "ip_hidden_states" in extra:  # one image's tokens for every frame, as the text
                extra["ip_hidden_states"] = extra["ip_hidden_states"].repeat_interleave(f, dim=0)
            if "added_cond_kwargs" in extra:  # SDXL: a video's pooled text and time ids for every frame
                extra["added_cond_kwargs"] = {n: v.repeat_interleave(f, dim=0)
                                              for n, v in extra["added_cond_kwargs"].items()}
            extra.update(self.unet_call_keywords(tuple(x.shape), (h, w)))
            out = self.unet_model(x, t, ctx, num_frames=f, **extra).float()
            return out.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)
        extra.update(self.unet_call_keywords(tuple(latent.shape), tuple(latent.shape[2:])))
        return self.unet_model(latent.to(self.dtype), t, cond.text.to(self.dtype), **extra).float()

    @torch.inference_mode()
    def controlnet(self, module, latent: torch.Tensor, timestep: float, conditioning: Conditioning,
                   image: torch.Tensor, scale: float, guess_mode: bool = False) -> tuple[tuple[torch.Tensor, ...],
                                                                                          torch.Tensor]:
        cond = as_conditioning(conditioning)
        module.to(self.device)  # loaded beside the model: follows pipe.to(device) here (a no-op when it is there)
        t = torch.tensor([float(timestep)], dtype=torch.float32, device=self.device)
        extra = self.unet_keywords(replace(cond, down_block_residuals=None, mid_block_residual=None,
                                           ip_hidden_states=None),
                                   lambda a: a.to(self.dtype))
        ctx, frames = cond.text.to(self.dtype), None
        if latent.ndim == 5:  # (B, C, F, h, w): frames join the batch, frame-minor, as the UNet runs them
            b, c, frames, h, w = latent.shape
            latent = latent.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
            ctx = ctx.repeat_interleave(frames, dim=0)
            extra = {k: {n: v.repeat_interleave(frames, dim=0) for n, v in d.items()} for k, d in extra.items()}
        down, mid = module(latent.to(self.dtype), t, ctx, image.to(self.dtype), scale, guess_mode, **extra)
        if frames is not None:  # (B, F, C, h, w): one entry per video, as the Conditioning's batch
            down = [r.reshape(-1, frames, *r.shape[1:]) for r in down]
            mid = mid.reshape(-1, frames, *mid.shape[1:])
        return tuple(down), mid

    @torch.inference_mode()
    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent.to(self.vae_dtype)).float()

    @torch.inference_mode()
    def vae_encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.vae.encode(images.to(self.vae_dtype))
        return mean.float(), logvar.float()

    def latent_from_numpy(self, latent: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32)).to(self.device)

    def latent_to_numpy(self, latent: torch.Tensor) -> np.ndarray:
        return latent.detach().float().cpu().numpy()

    def load_network(self, root, name: str, description: ModelDescription, files=None) -> torch.nn.Module:
        from ...model_loading import load_network

        return load_network(root, name, TorchNetworks(self.device), dtype=TorchNetworks.dtype_name(self.dtype),
                            description=description, files=files)

    def to_device(self, device: str) -> None:
        self.device = torch.device(device)
        modules = [self.text_encoder, self.unet_model, self.vae, *getattr(self, "components", {}).values()]
        for module in {id(m): m for m in modules if isinstance(m, torch.nn.Module)}.values():
            module.to(self.device)

    def latent_to_public(self, latent: torch.Tensor) -> torch.Tensor:
        return latent  # torch keeps diffusers' layout

    def latent_from_public(self, latent) -> torch.Tensor:
        if isinstance(latent, torch.Tensor):
            return latent.detach().to(self.device, torch.float32)
        return super().latent_from_public(latent)

    def images_from_numpy(self, images: np.ndarray) -> torch.Tensor:
        nchw = np.ascontiguousarray(np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2))
        return torch.from_numpy(nchw).to(self.device)

    def images_to_numpy(self, images: torch.Tensor) -> np.ndarray:
        return images.detach().float().permute(0, 2, 3, 1).cpu().numpy()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().float().cpu().numpy()

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays), dim=0)

    def concat_channels(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays), dim=1)

    def per_sample_std(self, x: torch.Tensor) -> torch.Tensor:
        return x.std(dim=tuple(range(1, x.ndim)), keepdim=True)

    def all_finite(self, x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def latent_shape(self, latent: torch.Tensor) -> tuple[int, ...]:
        return tuple(latent.shape)

    def pad_frames(self, latent: torch.Tensor, before: int, after: int) -> torch.Tensor:
        shape = list(latent.shape)
        parts = [latent]
        if before:
            parts.insert(0, latent.new_zeros(shape[:2] + [before] + shape[3:]))
        if after:
            parts.append(latent.new_zeros(shape[:2] + [after] + shape[3:]))
        return torch.cat(parts, dim=self.frame_axis) if len(parts) > 1 else latent

    def available_memory(self) -> int | None:
        """CUDA: free device memory; MPS: the recommended maximum less what torch holds; CPU: free RAM."""
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        if self.device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
            return max(int(torch.mps.recommended_max_memory()) - int(torch.mps.current_allocated_memory()), 0)
        return super().available_memory()

    @property
    def fused_attention(self) -> bool:
        """scaled_dot_product_attention picks a flash / memory-efficient kernel on CUDA and the CPU."""
        return self.device.type in ("cuda", "cpu")

    def evaluate(self, *arrays: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_motion_norm_per_frame(self, per_frame: bool) -> None:
        for module in self.unet_model.modules():
            if hasattr(module, "per_frame_norm"):
                module.per_frame_norm = bool(per_frame)

    def lora_host(self):
        from .lora import TorchLoRAHost

        return TorchLoRAHost(self)

    def ip_adapter_host(self):
        from .ip_adapter import TorchIPAdapterHost

        return TorchIPAdapterHost(self)

    def set_token_merging(self, config):
        from ...token_merging import attach_token_merging
        from .token_merge import bipartite_soft_matching
        from .unet import BasicTransformerBlock

        return attach_token_merging(self.unet_model.named_modules(), BasicTransformerBlock, config,
                                    bipartite_soft_matching)

    def set_attention_chunk(self, chunk: int | None) -> None:
        for model in (self.unet_model, self.vae):
            for module in model.modules():
                if hasattr(module, "set_query_chunk"):
                    module.set_query_chunk(chunk)
