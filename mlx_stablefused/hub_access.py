"""Is the Hugging Face Hub reachable? Answered in at most a couple of seconds, before any download.

huggingface_hub retries a failed request five times with backoff (about 23 s, six log lines) before it
gives up; offline users should not pay that on every run. ``HF_HUB_OFFLINE=1`` skips the network at
once (the hub's own switch); otherwise one TCP connection to the hub (or to the HTTPS proxy, when one is
configured) decides, and the answer is remembered for a short while.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
REMEMBER_S = 30.0  # a long-running process (a server) notices the network coming back
_TRUE = {"1", "ON", "YES", "TRUE"}
_last: tuple[float, str, str | None] | None = None  # (when, endpoint, reason)


def hub_endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT`` where set, as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def offline_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers a TCP connection; else a short reason, e.g. ``huggingface.co unreachable``."""
    global _last
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()
    now = time.monotonic()
    if _last is not None and _last[1] == endpoint and now - _last[0] < REMEMBER_S:
        return _last[2]
    reason = _probe(endpoint, timeout)
    _last = (now, endpoint, reason)
    return reason


def _probe(endpoint: str, timeout: float) -> str | None:
    url = urlparse(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        what = f"the proxy {target.hostname}"
    else:
        target, what = url, url.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"{what} unreachable: no answer in {timeout:g} s"
    except OSError as e:
        return f"{what} unreachable: {e.strerror or type(e).__name__}"
