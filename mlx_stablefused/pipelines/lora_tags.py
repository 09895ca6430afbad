"""``<lora:name:weight>`` prompt tags applied through the pipeline's LoRA methods (diffusers' names:
``load_lora_weights(path, adapter_name=name)`` and ``set_adapters(names, adapter_weights)``).

A tag names a file in the LoRA folder (``name.safetensors``, ``.pt``, ``.ckpt`` or ``.bin``, in any
subfolder, as AUTOMATIC1111 searches its Lora folder). Each file is loaded once; every call then sets
the weights of all tag-loaded adapters: the tags' weights, 0 for adapters the prompt does not name
(AUTOMATIC1111 deactivates LoRAs a prompt leaves out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def find_lora_file(folder: Path, name: str) -> Path:
    """The one file named ``name`` + a LoRA suffix under ``folder``; an error naming the tag otherwise."""
    matches = sorted(p for p in folder.rglob(f"{name}.*") if p.is_file() and p.suffix in LORA_SUFFIXES
                     and p.stem == name)
    if not matches:
        raise ValueError(f"<lora:{name}>: no {name}{{{','.join(LORA_SUFFIXES)}}} in the LoRA folder {folder}")
    if len(matches) > 1:
        raise ValueError(f"<lora:{name}>: several files match in {folder}: {', '.join(map(str, matches))}")
    return matches[0]


@dataclass
class LoraTagState:
    """The LoRA folder and the adapters its tags have loaded so far (adapter name -> file)."""

    folder: Path
    loaded: dict[str, Path] = field(default_factory=dict)

    def apply(self, pipe: Any, tags: Sequence[Any]) -> None:
        """Load the tags' files not loaded yet, then set every tag-loaded adapter's weight."""
        if not tags and not self.loaded:
            return
        for method in ("load_lora_weights", "set_adapters"):
            if not callable(getattr(pipe, method, None)):
                raise NotImplementedError(f"<lora:...> tags need the pipeline's {method} (LoRA support), "
                                          "which this version lacks")
        wanted = {t.name: t.adapter_weight for t in tags}  # a repeated name: the last tag wins
        files = {name: self.loaded.get(name) or find_lora_file(self.folder, name) for name in wanted}
        for name, path in files.items():  # every file found before any is loaded
            if name not in self.loaded:
                pipe.load_lora_weights(str(path), adapter_name=name)
                self.loaded[name] = path
        names = list(self.loaded)
        pipe.set_adapters(names, adapter_weights=[wanted.get(n, 0.0) for n in names])
