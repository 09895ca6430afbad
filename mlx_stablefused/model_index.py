"""A model's ``model_index.json`` before it is loaded: it names the diffusers pipeline class, which picks
the ``ModelDescription`` (SD or SDXL, and which SDXL components), and holds the pipeline's own config
(``force_zeros_for_empty_prompt``, ``requires_aesthetics_score``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import read_json
from .sources import _REPO_ID


def read_model_index(model_id: str | Path, *, revision: str | None = None,
                     local_files_only: bool = False) -> dict[str, Any]:
    """The model index of a folder or hub repo, or ``{}`` when there is none to read (the resolver then
    reports what is wrong with ``model_id``). A hub repo's index is fetched alone, before anything else."""
    path = Path(model_id).expanduser() if isinstance(model_id, (str, Path)) else None
    if path is None:
        return {}
    if path.is_dir():
        index = path / "model_index.json"
        return read_json(index) if index.is_file() else {}
    text = str(model_id)
    if path.exists() or not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        return {}
    try:
        from huggingface_hub import hf_hub_download

        from .hub_access import offline_reason

        offline = local_files_only or offline_reason() is not None  # no retries when the hub is unreachable
        return read_json(hf_hub_download(text, "model_index.json", revision=revision, local_files_only=offline))
    except Exception:  # offline, no such repo, no index: the resolver gives the real error
        return {}
