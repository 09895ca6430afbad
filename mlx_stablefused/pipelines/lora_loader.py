"""diffusers' LoRA methods on every pipeline (``StableDiffusionLoraLoaderMixin``'s names), delegating to
``mlx_stablefused.lora``. The adapters live with the loaded networks (the backend), not the pipeline:
pipelines sharing components (``from_pipeline``) share them, as they share the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


class LoRALoaderMixin:
    """Needs ``self.backend`` and ``self.source`` (BaseDiffusion has both)."""

    @property
    def _lora(self) -> Any:
        return self.backend.lora_state(model=f"model {self.source.origin!r}")

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, Any],
                          adapter_name: str | None = None, weight_name: str | None = None, *,
                          local_files_only: bool = False) -> str:
        """Load a LoRA (kohya / A1111, LyCORIS LoCon, diffusers or PEFT format) onto the UNet and text
        encoder and make it the active adapter, with weight 1 (as diffusers; ``set_adapters`` combines
        several). The source is a file, a folder (``weight_name``, else its one weight file), a hub repo id
        with ``weight_name``, ``owner/repo/file.safetensors``, or a state dict.
        Every key must fit a layer of this model: one that does not is an error naming it. Returns the
        adapter's name (``adapter_name``, else ``default_<n>`` as diffusers names them)."""
        from ..lora import load_lora_source

        tensors, metadata, origin = load_lora_source(pretrained_model_name_or_path_or_dict, weight_name,
                                                     local_files_only=local_files_only)
        return self._lora.load(tensors, metadata, origin, adapter_name).name

    def set_adapters(self, adapter_names: str | Sequence[str],
                     adapter_weights: float | Sequence[float | None] | None = None) -> None:
        """Make exactly these adapters active, with these weights (one number for all; default 1)."""
        self._lora.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return list(self._lora.active) if self._lora.enabled else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Component -> the loaded adapters that patch it (diffusers' shape of answer)."""
        out: dict[str, list[str]] = {}
        for name, adapter in self._lora.adapters.items():
            for component in adapter.layers:
                out.setdefault(component, []).append(name)
        return out

    def disable_lora(self) -> None:
        """Run without the adapters (they stay loaded; ``enable_lora()`` brings them back)."""
        self._lora.set_enabled(False)

    def enable_lora(self) -> None:
        self._lora.set_enabled(True)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> int:
        """Add the active adapters (times their weights and ``lora_scale``) into the weights: the layers then
        run at their plain speed. The originals are kept; ``unfuse_lora()`` restores them exactly. Not on
        quantized layers (LoRAs run unfused there). Returns the number of fused layers."""
        return self._lora.fuse(lora_scale, adapter_names)

    def unfuse_lora(self) -> None:
        self._lora.unfuse()

    def unload_lora_weights(self) -> None:
        """Remove every adapter. Weights fused before stay fused (diffusers' fuse_lora + unload_lora_weights)."""
        self._lora.unload()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        self._lora.delete(adapter_names)
