"""What one server run is configured with: the model, the bind address, the key, and the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    """Per-request ceilings, refused with 422 naming the field; the queue's length, beyond which 503."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch: int = 8  # images in one request: batch_size x n_iter, or OpenAI's n
    max_frames: int = 64  # frames in one video, cells in one sweep grid (the web UI's jobs)
    max_queue: int = 16  # requests waiting behind the running one
    max_body_bytes: int = 32 * 1024 * 1024  # a 2048x2048 PNG in base64 is ~16 MB


@dataclass(frozen=True)
class ServerSettings:
    model: str
    backend: str = "mlx"
    dtype: str = "float32"
    device: str | None = None
    variant: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    lora_dir: Path | None = None
    motion_adapter: str | None = None  # AnimateDiff videos (the demo model has its own)
    outputs: Path | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS
