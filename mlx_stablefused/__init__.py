"""mlx-stablefused: Stable Diffusion on Apple Silicon through MLX, with stablefused's API."""

__version__ = "0.1.0"


from .errors import LoRAError, ModelSourceError, NonFiniteError, UnsupportedModelError, WeightLoadError  # noqa: E402
from .pipelines.base import BaseDiffusion, ModelComponents  # noqa: E402
from .pipelines.image_to_image import ImageToImageDiffusion  # noqa: E402
from .pipelines.inpaint import InpaintDiffusion  # noqa: E402
from .pipelines.latent_walk import LatentWalkDiffusion  # noqa: E402
from .pipelines.walk_geometry import WalkType  # noqa: E402
from .pipelines.text_to_image import TextToImageDiffusion  # noqa: E402
from .pipelines.text_to_video import ANIMATEDIFF_DDIM, TextToVideoDiffusion  # noqa: E402
from .schedulers import SCHEDULER_NAMES  # noqa: E402
from .tokenizer import PromptTruncatedWarning  # noqa: E402
from .utils.images import (image_grid, numpy_to_pil, pil_to_gif, pil_to_numpy, pil_to_video,  # noqa: E402
                           write_text_on_image)
from .utils.interpolation import lerp, slerp  # noqa: E402

__all__ = [
    "BaseDiffusion",
    "ModelComponents",
    "TextToImageDiffusion",
    "TextToVideoDiffusion",
    "ANIMATEDIFF_DDIM",
    "ImageToImageDiffusion",
    "InpaintDiffusion",
    "LatentWalkDiffusion",
    "WalkType",
    "SCHEDULER_NAMES",
    "LoRAError",
    "ModelSourceError",
    "NonFiniteError",
    "UnsupportedModelError",
    "WeightLoadError",
    "PromptTruncatedWarning",
    "image_grid",
    "numpy_to_pil",
    "pil_to_numpy",
    "pil_to_gif",
    "pil_to_video",
    "write_text_on_image",
    "lerp",
    "slerp",
]
