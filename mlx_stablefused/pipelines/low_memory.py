"""The low-memory preset: every option that lowers a generation's peak memory, switched on together.

``pipe.enable_low_memory()`` (CLI ``--low-memory``) sets, on this pipeline:

* the text encoders' weights freed after each prompt encoding (MLX: re-read lazily from the converted
  file the next time a prompt is encoded, so a new prompt just works; the torch backend keeps them:
  its loader reads diffusers files it cannot map back in, so only the options below apply there);
* the UNet's weights freed after each denoising loop (MLX: re-read lazily at its next use, a read of
  the converted file: 1.6 GB for SD 1.5, 4.9 GB for SDXL in fp16), so the VAE decodes beside only itself;
  kept where the file does not hold them (a motion UNet, LoRA adapters, a quantized UNet) and on torch;
* attention in slices of at most ``base.AUTO_ATTENTION_CHUNK`` query tokens (exact);
* the UNet's batch one sample per pass, each pass computed before the next (``RunSettings.unet_batch_size``
  = 1): with classifier-free guidance the unconditional and conditional halves one after the other, so a
  step holds one sample's activations, not two (exact: each sample's numbers are its own). On MLX's CPU
  build the halves no longer run on two cores at once (see the README's time cost);
* MLX's CPU build: each UNet pass allocates at most 512 MB ahead of the threads computing it
  (``cpu_memory.bounded_run_ahead``, as VAE passes do; on by default since it measured no slower, and
  kept on here even where a pipeline turned it off): unbounded, an SD 1.5 step at 512x512 held 2.2 GB
  of activations, sliced attention or not; VAE passes get the same flat 512 MB instead of their default of
  four feature maps (1 GB at 512x512: the decode 18.5 s instead of 13.3 s, its peak 877 instead of 1146 MB
  over the weights; fp32, 2-core EPYC);
* the VAE decoding one image at a time (exact). VAE tiling stays the caller's choice (``enable_tiling()``):
  it changes images larger than the VAE's sample size (512 px for SD 1.x, 1024 for SDXL) and saves
  nothing at or below it, so the preset is exact at every size;
* optionally ``unet_bits=8``: the UNet's Linear layers quantized (MLX only, ``nn.quantize``; it changes
  the loaded weights for every pipeline sharing them and stays until the model is reloaded; the
  torch backend refuses it).

The preset gives the default path's images to float rounding; the README's
memory section has the peaks and time costs, measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

Pipeline = Any  # a BaseDiffusion (not imported: base.py imports this module)


@dataclass(frozen=True)
class MemoryOptions:
    """The memory-related choices of one pipeline, as they were before the preset (to restore them)."""

    release_text_encoder: bool
    release_unet: bool
    attention_chunk: int | None
    bounded_unet_run_ahead: bool
    vae_run_ahead_by_size: bool
    unet_batch_size: int | None
    decode_batch_size: int | None
    tiling: Any

    @classmethod
    def of(cls, pipe: Pipeline) -> "MemoryOptions":
        return cls(pipe.release_text_encoder, pipe.release_unet, pipe.settings.attention_chunk,
                   pipe.settings.bounded_unet_run_ahead, pipe.settings.vae_run_ahead_by_size,
                   pipe.settings.unet_batch_size, pipe.decode_batch_size,
                   pipe.tiling)

    def apply_to(self, pipe: Pipeline) -> None:
        pipe.release_text_encoder, pipe.release_unet = self.release_text_encoder, self.release_unet
        pipe.settings = replace(pipe.settings, attention_chunk=self.attention_chunk,
                                bounded_unet_run_ahead=self.bounded_unet_run_ahead,
                                vae_run_ahead_by_size=self.vae_run_ahead_by_size,
                                unet_batch_size=self.unet_batch_size)
        pipe.decode_batch_size, pipe.tiling = self.decode_batch_size, self.tiling


def enable_low_memory(pipe: Pipeline, enabled: bool = True, unet_bits: int | None = None,
                      attention_chunk: int = 1024, unet_batch_size: int | None = 1) -> None:
    """Switch the preset on (or, ``enabled=False``, back to the options chosen before it; a quantized UNet
    stays quantized). Refused before anything changes: ``unet_bits`` other than None or 8, or 8 bits on a
    backend without quantization, ``unet_batch_size`` not None or a positive whole number.
    ``attention_chunk``: the slice size (the pipeline's automatic one). ``unet_batch_size``: samples per UNet
    pass (None: the whole batch at once, the guidance halves side by side: faster on a multi-core CPU)."""
    from ..backends.base import QUANTIZE

    if unet_bits not in (None, 8):
        raise ValueError(f"enable_low_memory: unet_bits is None or 8, got {unet_bits!r}")
    if unet_batch_size is not None and (isinstance(unet_batch_size, bool) or not isinstance(unet_batch_size, int)
                                        or unet_batch_size < 1):
        raise ValueError(f"enable_low_memory: unet_batch_size is None or a positive whole number, got "
                         f"{unet_batch_size!r}")
    if unet_bits is not None and not pipe.backend.supports(QUANTIZE):
        raise NotImplementedError(f"enable_low_memory(unet_bits=8): the {pipe.backend.name} backend has no "
                                  "quantized path (use the MLX backend, or leave unet_bits=None)")
    saved = getattr(pipe, "_options_before_low_memory", None)
    if not enabled:
        if saved is not None:
            saved.apply_to(pipe)
            pipe._options_before_low_memory = None
        return
    if saved is None:
        pipe._options_before_low_memory = MemoryOptions.of(pipe)
    chunk = pipe.settings.attention_chunk
    MemoryOptions(release_text_encoder=True, release_unet=True,
                  attention_chunk=min(chunk, attention_chunk) if chunk else attention_chunk,
                  bounded_unet_run_ahead=True, vae_run_ahead_by_size=False, unet_batch_size=unet_batch_size,
                  decode_batch_size=1, tiling=pipe.tiling).apply_to(pipe)
    if unet_bits is not None and not _quantized(pipe.backend.unet_model):
        pipe.quantize(bits=unet_bits, components=("unet",))


def _quantized(model: Any) -> bool:
    return any(type(m).__name__.startswith("Quantized") for _, m in model.named_modules())
