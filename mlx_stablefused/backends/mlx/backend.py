"""The MLX backend: runs the networks on Metal (or MLX's CPU/CUDA builds), NHWC inside."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Sequence

import mlx.core as mx
import numpy as np

from ...conditioning import Conditioning, as_conditioning
from ...model_description import STABLE_DIFFUSION, ModelDescription
from ...motion_adapters import MotionAdapterSource
from ...sources import ModelSource
from ...topology import CoderPlan
from ..base import COMPILE, CPU_STREAMS, QUANTIZE, Backend, RunSettings
from . import cpu_math
from .cpu_memory import DEFAULT_HEADROOM, bounded_run_ahead, vae_headroom
from .cpu_streams import StreamSet, default_stream_count, eval_in_lockstep, marking, split_axis, split_sizes
from .loading import MLXNetworks, load_model


class MLXBackend(Backend):
    name = "mlx"
    native_output_type = "mlx"
    capabilities = frozenset({COMPILE, QUANTIZE, CPU_STREAMS})
    frame_axis = 1  # video latents are (B, F, h, w, C)

    def __init__(self, source: ModelSource, dtype: str = "float32", variant: str | None = None,
                 use_cache: bool = True, device: str | None = None,
                 motion_adapter: MotionAdapterSource | None = None, cpu_streams: int | None = None,
                 description: ModelDescription = STABLE_DIFFUSION) -> None:
        if device not in (None, "gpu", "cpu"):
            raise ValueError(f"the MLX backend runs on 'gpu' or 'cpu', not {device!r}")
        if device is not None:
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        if mx.default_device() == mx.cpu:
            from ..._malloc import keep_freed_memory

            keep_freed_memory()  # MLX's CPU allocator has no buffer cache: no page-fault churn (see _malloc)
        self.cpu_run_ahead = DEFAULT_HEADROOM  # bytes a pass may allocate ahead on the CPU (VAE: at least; cpu_memory)
        self.dtype = MLXNetworks.native_dtype(dtype)
        loaded = load_model(source, MLXNetworks.dtype_name(self.dtype), variant=variant, use_cache=use_cache,
                            motion_adapter=motion_adapter, description=description)
        for name, value in loaded.backend_fields().items():  # text_encoder, unet_model, vae, their configs,
            setattr(self, name, value)  # components, configs (dicts by component name), description, motion_config
        self._weights_files = loaded.weights_files  # converted files, re-read lazily (see release_text_encoder)
        if self.dtype != mx.float32 and mx.default_device() == mx.cpu:  # no half-precision BLAS on the CPU
            from .cpu_math import half_linears_in_float32

            for module in {id(m): m for m in [self.unet_model, self.vae, *self.components.values()]}.values():
                half_linears_in_float32(module)
        self._unet_fn = None
        self.set_cpu_streams(cpu_streams)
        self._settings = RunSettings(cpu_streams=cpu_streams)

    def set_cpu_streams(self, count: int | None = None) -> int:
        """Run independent work on ``count`` CPU streams (one core each): the halves of a guidance batch
        through the UNet, row bands of the VAE. None picks one per core on MLX's CPU build, 1 on Metal.
        Results agree with one stream to float32 rounding. Returns the count in use."""
        count = default_stream_count() if count is None else int(count)
        if count < 1:
            raise ValueError(f"the number of CPU streams must be at least 1, got {count}")
        if count > 1 and mx.default_device() != mx.cpu:
            count = 1  # one GPU queue: splitting would only serialise
        self.stream_set = StreamSet(count) if count > 1 else None
        for module in {id(m): m for m in [self.vae, *getattr(self, "components", {}).values()]}.values():
            if hasattr(module, "set_stream_set"):  # the VAE, and a tiny autoencoder loaded beside it
                module.set_stream_set(self.stream_set)
        return count

    @property
    def cpu_stream_count(self) -> int:
        return 1 if self.stream_set is None else len(self.stream_set.streams)

    def encode_text(self, token_ids: np.ndarray) -> mx.array:
        out = self.text_encoder(mx.array(token_ids)).last_hidden_state
        mx.eval(out)
        return out

    def encode_text_states(self, token_ids: np.ndarray, component: str = "text_encoder",
                           hidden_state: int = -2) -> tuple[mx.array, mx.array]:
        out = self.components[component](mx.array(token_ids), output_hidden_states=True)
        pooled = out.pooler_output if out.text_embeds is None else out.text_embeds
        hidden = out.hidden_states[hidden_state]
        mx.eval(hidden, pooled)
        return hidden, pooled

    def available_memory(self) -> int | None:
        """Metal: the recommended working set less what MLX holds now; CPU: free RAM."""
        if mx.default_device() == mx.gpu and mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
            if limit:
                return max(int(limit) - int(mx.get_active_memory()), 0)
        return super().available_memory()

    @property
    def fused_attention(self) -> bool:
        """mx.fast.scaled_dot_product_attention on Metal never materialises the scores."""
        return mx.default_device() == mx.gpu and mx.metal.is_available()

    @property
    def attention_slice_bytes(self) -> int | None:
        """On the CPU attention is always sliced (cpu_math.CPU_SLICE_SCORE_BYTES of float32 scores a slice)."""
        return cpu_math.CPU_SLICE_SCORE_BYTES if cpu_math.on_cpu() else None

    TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"

    def set_token_embeddings_from(self, first_id: int, vectors: np.ndarray, component: str = "text_encoder") -> None:
        import mlx.nn as nn

        embeddings = self.components[component].text_model.embeddings
        weight = embeddings.token_embedding.weight
        # Per text encoder: rows [:kept] come from the weight file (re-read on release), the added rows from here.
        kept, added = getattr(self, "_added_token_rows", {}).get(
            component, (int(first_id), np.zeros((0, weight.shape[1]), np.float32)))
        keep = int(first_id) - kept
        if keep < 0 or keep > len(added) or first_id > weight.shape[0]:
            raise ValueError(f"token embedding rows can only be replaced from row {kept} to "
                             f"{weight.shape[0]}, not from {first_id}")
        self._added_token_rows = {**getattr(self, "_added_token_rows", {}),
                                  component: (kept, np.concatenate([added[:keep], np.asarray(vectors, np.float32)]))}
        table = nn.Embedding(1, weight.shape[1])
        table.weight = mx.concatenate([weight[:first_id], mx.array(vectors).astype(weight.dtype)])
        mx.eval(table.weight)
        embeddings.token_embedding = table

    def _with_added_token_rows(self, weights: dict, component: str) -> dict:
        """File weights with the textual-inversion rows appended, as the loaded text encoder has them."""
        kept, added = getattr(self, "_added_token_rows", {}).get(component, (0, ()))
        if not len(added):
            return weights
        base = weights[self.TOKEN_EMBEDDING][:kept]
        return {**weights, self.TOKEN_EMBEDDING: mx.concatenate([base, mx.array(added).astype(base.dtype)])}

    def release_text_encoder(self) -> bool:
        """Free the text encoders' materialised weights (SDXL: both): they are re-read lazily (mx.load maps the
        converted file and reads on first use) the next time a prompt is encoded. False when there is no such
        file."""
        released = False
        for c in self.description.components:
            if c.role == "text_encoder":
                released = self._release_one_text_encoder(c.name) or released
        return released

    def _release_one_text_encoder(self, name: str) -> bool:
        path, module = self._weights_files.get(name), self.components.get(name)
        if path is None or name in self.lora_fused_components or any(
                type(m).__name__.startswith("Quantized") for _, m in module.named_modules()):
            return False
        from ...checkpoint_io import load_weights
        from .weights import apply_weights

        dtype = module.text_model.final_layer_norm.weight.dtype
        weights = load_weights(path)
        weights = self._with_added_token_rows(weights, name)
        apply_weights(module, weights, str(path), dtype)
        return True

    def release_unet(self) -> bool:
        """Free the UNet's materialised weights (re-read lazily from the converted file at its next use), so the
        VAE decodes with only itself in memory. False (kept) for weights the file does not hold: a motion UNet,
        LoRA adapters, a quantized UNet."""
        path, module = self._weights_files.get("unet"), self.unet_model
        if path is None or self.motion_config is not None or getattr(self, "_lora", None) is not None or any(
                type(m).__name__.startswith("Quantized") for _, m in module.named_modules()):
            return False
        from ...checkpoint_io import load_weights
        from .weights import apply_weights

        apply_weights(module, load_weights(path), str(path), module.conv_in.weight.dtype)
        self.unet_changed()  # a compiled step holds the old arrays
        return True

    def compile_unet(self, enabled: bool = True) -> None:
        """Trace the UNet once per input shape and run the fused graph (``mx.compile``)."""
        self._unet_fn = mx.compile(self.unet_model.__call__) if enabled else None

    def quantize(self, bits: int = 8, group_size: int = 64, components: tuple[str, ...] = ("unet",)) -> None:
        """Quantize the Linear layers of ``components`` (``nn.quantize``); convolutions stay as they are."""
        import mlx.nn as nn

        lora = getattr(self, "_lora", None)
        if lora is not None and lora.fused_components & set(components):
            raise RuntimeError("quantize: LoRA weights are fused into these layers; unfuse_lora() first (LoRAs "
                               "run unfused on quantized layers)")
        for name in components:
            model = {"unet": self.unet_model, "text_encoder": self.text_encoder}[name]
            nn.quantize(model, group_size=group_size, bits=bits,
                        class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % group_size == 0)
            if self.dtype != mx.float32 and mx.default_device() == mx.cpu:  # as the plain layers (see __init__)
                from .cpu_math import half_quantized_linears_in_float32

                half_quantized_linears_in_float32(model)
        if lora is not None:
            lora.refresh()  # quantized layers replaced the patched ones: attach the terms again
        self.unet_changed()

    def unet_changed(self) -> None:
        """The UNet's layers or weights changed (quantize, LoRA): re-trace a compiled step."""
        if self._unet_fn is not None:
            self.compile_unet()

    def lora_host(self):
        from .lora import MLXLoRAHost

        return MLXLoRAHost(self)

    def ip_adapter_host(self):
        from .ip_adapter import MLXIPAdapterHost

        return MLXIPAdapterHost(self)

    def unet(self, latent: mx.array, timestep: float, conditioning: Conditioning | mx.array) -> mx.array:
        if not self.settings.bounded_unet_run_ahead or mx.default_device() != mx.cpu:
            return self.in_unet_passes(self._unet_parts, latent, timestep, conditioning)
        # One UNet pass is one graph: unbounded, MLX's CPU build allocates the buffers of all its attention
        # slices ahead of the threads computing them. Weights first, so the bound is over them (cpu_memory).
        mx.eval(self.unet_model.parameters())
        with bounded_run_ahead(self.cpu_run_ahead):
            out = self.in_unet_passes(self._unet_parts, latent, timestep, conditioning)
            mx.eval(out)
        return out

    def _unet_parts(self, latent: mx.array, timestep: float, conditioning: Conditioning | mx.array) -> mx.array:
        cond = as_conditioning(conditioning)
        streams = self.stream_set.streams[:latent.shape[0]] if self.stream_set is not None else []
        if len(streams) < 2 or cond.batch_size != latent.shape[0]:
            return self._unet_once(latent, timestep, cond)
        # CPU: each part of the batch (e.g. the unconditional and conditional halves) on its own core.
        parts, marks = [], []
        sizes = split_sizes(latent.shape[0], len(streams))
        for stream, lat, part in zip(streams, split_axis(latent, len(streams), 0), cond.split(sizes)):
            recording = marking() if self._unet_fn is None else contextlib.nullcontext([])  # not tracers
            with mx.stream(stream), recording as layer_outputs:
                parts.append(self._unet_once(lat, timestep, part))
            marks.append(layer_outputs)
        with self.stream_set.sharing_cores(len(parts)):
            out = mx.concatenate(parts, axis=0)
            eval_in_lockstep(marks, out)
        return out

    def _unet_once(self, latent: mx.array, timestep: float, cond: Conditioning) -> mx.array:
        t = mx.array(float(timestep), dtype=mx.float32)
        run = self._unet_fn or self.unet_model
        if cond.image_channels is not None:
            latent = mx.concatenate([latent, cond.image_channels], axis=-1)
        extra = self.unet_keywords(cond, lambda a: a.astype(self.dtype))
        if latent.ndim == 5:  # videos (B, F, h, w, C): frames join the batch, frame-minor
            b, f = latent.shape[:2]
            extra = self.frames_into_batch(extra)
            x = latent.reshape(b * f, *latent.shape[2:]).astype(self.dtype)
            ctx = mx.repeat(cond.text.astype(self.dtype), f, axis=0)
            if "ip_hidden_states" in extra:  # one image's tokens for every frame, as the text
                extra["ip_hidden_states"] = mx.repeat(extra["ip_hidden_states"], f, axis=0)
            if "added_cond_kwargs" in extra:  # SDXL: a video's pooled text and time ids for every frame
                extra["added_cond_kwargs"] = {n: mx.repeat(v, f, axis=0) for n, v in extra["added_cond_kwargs"].items()}
            extra.update(self.unet_call_keywords(tuple(x.shape), tuple(x.shape[1:3])))
            out = run(x, t, ctx, num_frames=f, **extra).astype(mx.float32)
            return out.reshape(b, f, *out.shape[1:])
        extra.update(self.unet_call_keywords(tuple(latent.shape), tuple(latent.shape[1:3])))
        return run(latent.astype(self.dtype), t, cond.text.astype(self.dtype), **extra).astype(mx.float32)

    def controlnet(self, module, latent: mx.array, timestep: float, conditioning: Conditioning, image: mx.array,
                   scale: float, guess_mode: bool = False) -> tuple[tuple[mx.array, ...], mx.array]:
        cond = as_conditioning(conditioning)
        t = mx.array(float(timestep), dtype=mx.float32)
        extra = self.unet_keywords(replace(cond, down_block_residuals=None, mid_block_residual=None,
                                           ip_hidden_states=None),  # as diffusers: image tokens are the UNet's
                                   lambda a: a.astype(self.dtype))
        ctx, frames = cond.text.astype(self.dtype), None
        if latent.ndim == 5:  # (B, F, h, w, C): frames join the batch, frame-minor, as the UNet runs them
            b, frames = latent.shape[:2]
            latent = latent.reshape(b * frames, *latent.shape[2:])
            ctx = mx.repeat(ctx, frames, axis=0)
            extra = {k: {n: mx.repeat(v, frames, axis=0) for n, v in d.items()} for k, d in extra.items()}
        down, mid = module(latent.astype(self.dtype), t, ctx, image.astype(self.dtype), scale, guess_mode, **extra)
        if frames is not None:
            down = [r.reshape(-1, frames, *r.shape[1:]) for r in down]
            mid = mid.reshape(-1, frames, *mid.shape[1:])
        return tuple(down), mid

    def vae_run_ahead(self, coder: CoderPlan, x: mx.array) -> int | None:
        """The bytes a VAE pass over NHWC ``x`` may allocate ahead on the CPU: a few of its largest feature maps
        (the flat UNet bound under the low-memory preset, or None: unbounded)."""
        if self.cpu_run_ahead is None or not self.settings.vae_run_ahead_by_size:
            return self.cpu_run_ahead
        return vae_headroom(x.shape[0] * coder.largest_map(x.shape[1], x.shape[2]), self.cpu_run_ahead)

    def vae_decode(self, latent: mx.array) -> mx.array:
        vae_dtype = self.vae.decoder.conv_in.weight.dtype
        with bounded_run_ahead(self.vae_run_ahead(self.vae.plan.decoder, latent)):
            images = self.vae.decode(latent.astype(vae_dtype)).astype(mx.float32)
            mx.eval(images)
        return images

    def vae_encode(self, images: mx.array) -> tuple[mx.array, mx.array]:
        vae_dtype = self.vae.encoder.conv_in.weight.dtype
        with bounded_run_ahead(self.vae_run_ahead(self.vae.plan.encoder, images)):
            mean, logvar = self.vae.encode(images.astype(vae_dtype))
            mean, logvar = mean.astype(mx.float32), logvar.astype(mx.float32)
            mx.eval(mean, logvar)
        return mean, logvar

    def latent_from_numpy(self, latent: np.ndarray) -> mx.array:
        """(B, C, h, w) -> NHWC; videos (B, C, F, h, w) -> (B, F, h, w, C)."""
        arr = np.asarray(latent, dtype=np.float32)
        order = (0, 2, 3, 4, 1) if arr.ndim == 5 else (0, 2, 3, 1)
        return mx.array(np.ascontiguousarray(arr.transpose(order)))

    def latent_to_numpy(self, latent: mx.array) -> np.ndarray:
        arr = np.asarray(latent.astype(mx.float32))
        return arr.transpose((0, 4, 1, 2, 3) if arr.ndim == 5 else (0, 3, 1, 2)).copy()

    def load_network(self, root, name: str, description: ModelDescription, files=None) -> object:
        from ...model_loading import load_network
        from .loading import NETWORKS

        module = load_network(root, name, NETWORKS, dtype=MLXNetworks.dtype_name(self.dtype), description=description,
                              files=files)
        if hasattr(module, "set_stream_set"):
            module.set_stream_set(self.stream_set)
        return module

    @property
    def device(self) -> mx.Device:
        return mx.default_device()

    def to_device(self, device: str) -> None:
        """MLX arrays live in unified memory: the device is where operations run, MLX's default device."""
        if device not in ("gpu", "cpu"):
            raise ValueError(f"the MLX backend runs on 'gpu' or 'cpu', not {device!r}")
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)

    def latent_to_public(self, latent: mx.array) -> mx.array:
        return mx.transpose(latent, (0, 4, 1, 2, 3) if latent.ndim == 5 else (0, 3, 1, 2))

    def latent_from_public(self, latent) -> mx.array:
        if isinstance(latent, mx.array):
            return mx.transpose(latent, (0, 2, 3, 4, 1) if latent.ndim == 5 else (0, 2, 3, 1)).astype(mx.float32)
        return super().latent_from_public(latent)

    def images_from_numpy(self, images: np.ndarray) -> mx.array:
        return mx.array(np.asarray(images, dtype=np.float32))

    def images_to_numpy(self, images: mx.array) -> np.ndarray:
        return np.asarray(images.astype(mx.float32))

    def from_numpy(self, array: np.ndarray) -> mx.array:
        return mx.array(np.asarray(array, dtype=np.float32))

    def to_numpy(self, array: mx.array) -> np.ndarray:
        return np.asarray(array.astype(mx.float32))

    def concat(self, arrays: Sequence[mx.array]) -> mx.array:
        return mx.concatenate(list(arrays), axis=0)

    def concat_channels(self, arrays: Sequence[mx.array]) -> mx.array:
        return mx.concatenate(list(arrays), axis=-1)  # NHWC

    def per_sample_std(self, x: mx.array) -> mx.array:
        axes = tuple(range(1, x.ndim))
        # torch.std is the unbiased (n-1) estimator; diffusers' rescale uses it.
        return mx.sqrt(mx.var(x, axis=axes, keepdims=True, ddof=1))

    def all_finite(self, x: mx.array) -> bool:
        return bool(mx.all(mx.isfinite(x)).item())

    def latent_shape(self, latent: mx.array) -> tuple[int, ...]:
        shape = tuple(latent.shape)
        return (shape[0], shape[-1]) + shape[1:-1]

    def pad_frames(self, latent: mx.array, before: int, after: int) -> mx.array:
        widths = [(0, 0)] * latent.ndim
        widths[self.frame_axis] = (before, after)
        return mx.pad(latent, widths)

    def evaluate(self, *arrays: mx.array) -> None:
        mx.eval(*arrays)

    def apply_settings(self, settings: RunSettings) -> None:
        old = self.settings
        if settings.compile != old.compile:
            self.compile_unet(settings.compile)
        if settings.cpu_streams != old.cpu_streams:
            self.set_cpu_streams(settings.cpu_streams)
        super().apply_settings(settings)

    def set_motion_norm_per_frame(self, per_frame: bool) -> None:
        for _, module in self.unet_model.named_modules():
            if hasattr(module, "per_frame_norm"):
                module.per_frame_norm = bool(per_frame)

    def set_token_merging(self, config):
        from ...token_merging import attach_token_merging
        from .token_merge import bipartite_soft_matching
        from .unet import BasicTransformerBlock

        return attach_token_merging(self.unet_model.named_modules(), BasicTransformerBlock, config,
                                    bipartite_soft_matching)

    def set_attention_chunk(self, chunk: int | None) -> None:
        for model in (self.unet_model, self.vae):
            for _, module in model.named_modules():
                if hasattr(module, "set_query_chunk"):
                    module.set_query_chunk(chunk)
