"""stablefused's model cache: pipelines registered by ``model_id`` so another pipeline can share their
loaded components (``share_components_with``). Explicit here: constructors never consult it, because
``use_cache`` already names the MLX conversion cache (see "Migrating from stablefused")."""

from __future__ import annotations

from typing import Any


class ModelCache:
    """Pipelines by ``model_id``: ``set(pipe)`` registers one, ``get(model_id, default)`` looks one up."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}

    def get(self, model_id: str, default: Any = None) -> Any:
        return self.cache.get(str(model_id), default)

    def set(self, model: Any) -> None:
        if getattr(model, "model_id", None) is None:
            raise ValueError("only a pipeline loaded from a model_id can be cached by it")
        self.cache[str(model.model_id)] = model


_model_cache = ModelCache()
load_model_from_cache = _model_cache.get
save_model_to_cache = _model_cache.set
