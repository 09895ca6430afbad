"""What the UNet takes beyond (latent, timestep), as one object: ``Conditioning``.

Text embeddings today; pooled embeddings and time ids (SDXL), extra input channels
(inpainting's mask and masked image), residuals from extra networks (ControlNet) and image
tokens (IP-Adapter) have their fields, so a new kind of conditioning is a field and a few lines in the
backends, not a new argument threaded through every pipeline. Every field holds
backend-native arrays whose first axis is the batch; ``None`` means absent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

Array = Any  # a backend-native array


@dataclass(frozen=True)
class Conditioning:
    text: Array  # (B, L, D) encoder hidden states
    pooled_text: Array | None = None  # (B, D') pooled text embedding (SDXL's text_embeds)
    time_ids: Array | None = None  # (B, 6) SDXL micro-conditioning (sizes, crop)
    image_channels: Array | None = None  # latents concatenated to the UNet input (9-channel inpainting)
    down_block_residuals: tuple[Array, ...] | None = None  # added to the skip states (ControlNet)
    mid_block_residual: Array | None = None  # added to the mid block output (ControlNet)
    ip_hidden_states: Array | None = None  # (B, T, D) IP-Adapter image tokens for the decoupled cross-attention

    @property
    def batch_size(self) -> int:
        return int(self.text.shape[0])

    def map(self, fn: Callable[[Array], Array]) -> "Conditioning":
        """Apply ``fn`` to every array present (each residual too)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            changes[f.name] = tuple(fn(v) for v in value) if isinstance(value, tuple) else fn(value)
        return replace(self, **changes)

    def __getitem__(self, index: slice) -> "Conditioning":
        """The conditioning of a slice of the batch."""
        return self.map(lambda a: a[index])

    @staticmethod
    def concat(parts: Sequence["Conditioning"], concat: Callable[[Sequence[Array]], Array]) -> "Conditioning":
        """Join conditionings along the batch axis with the backend's ``concat``; all must have the same fields."""
        first = parts[0]
        changes: dict[str, Any] = {}
        for f in fields(first):
            values = [getattr(p, f.name) for p in parts]
            present = [v is not None for v in values]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"cannot join conditionings where only some have {f.name}")
            if isinstance(values[0], tuple):
                changes[f.name] = tuple(concat(group) for group in zip(*values))
            else:
                changes[f.name] = concat(values)
        return replace(first, **changes)

    def split(self, sizes: Sequence[int]) -> list["Conditioning"]:
        """Consecutive parts of the batch of the given ``sizes`` (they must add up to the batch size)."""
        if sum(sizes) != self.batch_size or min(sizes, default=0) < 1:
            raise ValueError(f"cannot split a batch of {self.batch_size} into parts of {list(sizes)}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self[s:s + n] for s, n in zip(starts, sizes)]


def as_conditioning(value: Conditioning | Array) -> Conditioning:
    """Accept a bare text embedding where a ``Conditioning`` is expected (the v0.1 call form)."""
    return value if isinstance(value, Conditioning) else Conditioning(text=value)
