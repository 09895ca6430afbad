"""The command line's IP-Adapter flags: ``--ip-adapter`` (a weight file, a folder holding one, a hub file
``owner/repo/path/file.safetensors``, or ``demo:ip-adapter``), ``--ip-adapter-image`` and
``--ip-adapter-scale``. They go together; a missing image or a lone flag is refused before a model loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli_values import finite
from .demo import DEMO_IP_ADAPTER_ID


def add_ip_adapter_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("IP-Adapter (an image as a prompt)")
    group.add_argument("--ip-adapter", default=None, metavar="ADAPTER",
                       help="IP-Adapter weight file (its image_encoder folder beside it), a folder holding one, a hub "
                            "file such as h94/IP-Adapter/models/ip-adapter_sd15.safetensors, or "
                            f"{DEMO_IP_ADAPTER_ID} (a random one for the demo model; default: none)")
    group.add_argument("--ip-adapter-image", default=None, metavar="PATH", help="the image prompt (default: none)")
    group.add_argument("--ip-adapter-scale", type=finite("--ip-adapter-scale"), default=None, metavar="SCALE",
                       help="how much the image prompt counts (default: 1.0; 0.5-0.7 to keep the text's say)")


def check_ip_adapter_flags(args: argparse.Namespace) -> None:
    """The three flags go together: an adapter needs an image, an image or a scale needs an adapter."""
    adapter, image = getattr(args, "ip_adapter", None), getattr(args, "ip_adapter_image", None)
    scale = getattr(args, "ip_adapter_scale", None)
    if adapter is None and (image is not None or scale is not None):
        flag = "--ip-adapter-image" if image is not None else "--ip-adapter-scale"
        raise ValueError(f"{flag}: needs --ip-adapter")
    if adapter is not None and image is None:
        raise ValueError("--ip-adapter: needs --ip-adapter-image (the image prompt)")


def adapter_location(spec: str) -> tuple[str, dict[str, str]]:
    """``--ip-adapter``'s value -> (source, load_ip_adapter keywords): a local file or folder as it is, a hub
    file ``owner/repo/sub/folders/file`` split into the repo, ``subfolder`` and ``weight_name``."""
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith("demo:"):
        return spec, {}
    parts = spec.split("/")
    if len(parts) < 3:
        raise ValueError(f"--ip-adapter: {spec!r} is not a file, a folder or a hub file owner/repo/path/file")
    keywords = {"weight_name": parts[-1]}
    if len(parts) > 3:
        keywords["subfolder"] = "/".join(parts[2:-1])
    return "/".join(parts[:2]), keywords


def load_flagged_ip_adapter(pipe: Any, args: argparse.Namespace) -> None:
    """Load ``--ip-adapter`` onto ``pipe`` and set ``--ip-adapter-scale`` (when given)."""
    spec = getattr(args, "ip_adapter", None)
    if spec is None:
        return
    source, keywords = adapter_location(spec)
    pipe.load_ip_adapter(source, **keywords)
    if args.ip_adapter_scale is not None:
        pipe.set_ip_adapter_scale(args.ip_adapter_scale)


def ip_adapter_keywords(args: argparse.Namespace) -> dict[str, Any]:
    image = getattr(args, "ip_adapter_image", None)
    return {} if image is None else {"ip_adapter_image": image}
