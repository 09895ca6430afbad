"""Exceptions raised by mlx-stablefused.

Each one subclasses the built-in exception a caller would naturally catch
(ValueError, FileNotFoundError, ...), so generic handlers keep working while
specific ones can tell a bad checkpoint from a bad argument.
"""


class ModelSourceError(FileNotFoundError):
    """A model id or path could not be resolved to usable files."""


class WeightLoadError(ValueError):
    """A checkpoint is unreadable, truncated, or does not fit the model (keys or shapes)."""


class LoRAError(WeightLoadError):
    """A LoRA file that does not fit the loaded model (unmatched keys, wrong shapes, an unsupported kind)."""


class IPAdapterError(ValueError):
    """An IP-Adapter that does not fit the loaded model (another base, another UNet, an encoder of another
    width), or an image prompt it cannot take (none loaded, the wrong number of images)."""


class UnsupportedModelError(ValueError):
    """A model config asks for an architecture feature this port does not implement."""


class NonFiniteError(FloatingPointError):
    """A generation produced NaN or infinite values (typically an fp16 overflow); nothing is written."""


class DistributedError(RuntimeError):
    """A launch across processes went wrong: ranks that differ (model, arguments), or a rank that died or
    stopped answering; raised on every surviving rank, before anything is written."""
