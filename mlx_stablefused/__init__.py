"""mlx-stablefused: Stable Diffusion on Apple Silicon through MLX, with stablefused's API."""

__version__ = "0.1.0"


from .control_maps import canny_image  # noqa: E402
from .controlnets import ControlNet, load_controlnet  # noqa: E402
from .errors import (DistributedError, IPAdapterError, LoRAError, ModelSourceError, NonFiniteError,  # noqa: E402
                     UnsupportedModelError, WeightLoadError)
from .pipelines.base import BaseDiffusion, ModelComponents  # noqa: E402
from .pipelines.data_parallel import guidance_sweep  # noqa: E402
from .pipelines.image_to_image import ImageToImageDiffusion  # noqa: E402
from .pipelines.inpaint import InpaintDiffusion  # noqa: E402
from .pipelines.latent_walk import LatentWalkDiffusion  # noqa: E402
from .pipelines.walk_geometry import WalkType  # noqa: E402
from .pipelines.text_to_image import TextToImageDiffusion  # noqa: E402
from .pipelines.text_to_video import ANIMATEDIFF_DDIM, TextToVideoDiffusion  # noqa: E402
from .schedulers import SCHEDULER_NAMES  # noqa: E402
from .tokenizer import PromptTruncatedWarning  # noqa: E402
from .typing import (ImageType, InpaintWalkType, OutputType, PromptType, Scheduler, SchedulerType,  # noqa: E402
                     UNetType)
from .utils import (denormalize, image_grid, lerp, load_model_from_cache, normalize, numpy_to_pil,  # noqa: E402
                    numpy_to_pt, pil_to_gif, pil_to_numpy, pil_to_video, pt_to_numpy, resolve_scheduler,
                    save_model_to_cache, slerp, write_text_on_image)

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
    "ControlNet",
    "load_controlnet",
    "canny_image",
    "SCHEDULER_NAMES",
    "LoRAError",
    "IPAdapterError",
    "ModelSourceError",
    "NonFiniteError",
    "UnsupportedModelError",
    "WeightLoadError",
    "DistributedError",
    "guidance_sweep",
    "PromptTruncatedWarning",
    "image_grid",
    "numpy_to_pil",
    "pil_to_numpy",
    "pil_to_gif",
    "pil_to_video",
    "write_text_on_image",
    "lerp",
    "slerp",
    # stablefused 0.2.0's other top-level names
    "Scheduler",
    "InpaintWalkType",
    "ImageType",
    "OutputType",
    "PromptType",
    "SchedulerType",
    "UNetType",
    "denormalize",
    "normalize",
    "numpy_to_pt",
    "pt_to_numpy",
    "load_model_from_cache",
    "save_model_to_cache",
    "resolve_scheduler",
]
