"""Inpainting with a mask, then an "infinite zoom" walk (zoom out, played backwards to zoom in) and a pan.

Mirrors stablefused's inpaint_diffusion notebook. Works with 9-channel inpainting models
(stable-diffusion-v1-5/stable-diffusion-inpainting) and, by latent blending, with ordinary ones.

    python examples/inpaint.py --model stable-diffusion-v1-5/stable-diffusion-inpainting
"""

import numpy as np
from _common import defaults, parser, saved, setup
from PIL import Image

from mlx_stablefused import InpaintDiffusion, TextToImageDiffusion, pil_to_video
from mlx_stablefused.cli_values import positive


def centre_mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255  # white: repaint
    return Image.fromarray(mask)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--image", default=None)
    p.add_argument("--walk-steps", type=positive("--walk-steps"), default=None,
                   help="inpainting steps of each walk (default: 4; 2 on the demo model)")
    p.add_argument("--frames", type=positive("--frames"), default=None,
                   help="frames per walk step (default: 30; 4 on the demo model)")
    defaults(p, walk_steps=(4, 2), frames=(30, 4))
    args = p.parse_args()
    pipe, out = setup(args, InpaintDiffusion)
    image = args.image
    if image is None:
        image = TextToImageDiffusion.from_pipeline(pipe)(
            "a quiet garden with a stone path", image_height=args.size, image_width=args.size,
            num_inference_steps=args.steps, seed=args.seed)[0]
        image.save(saved(out / "inpaint_input.png"))
    painted = pipe("a marble fountain in a garden", image, centre_mask(args.size), image_height=args.size,
                   image_width=args.size, num_inference_steps=args.steps, seed=args.seed)[0]
    painted.save(saved(out / "inpaint.png"))

    walk = dict(image_height=args.size, image_width=args.size, num_inpainting_steps=args.walk_steps,
                interpolation_steps=args.frames, num_inference_steps=args.steps, seed=args.seed,
                negative_prompt="text, watermark, frame")
    border = args.size // 8
    zoom_in = pipe.walk("an enchanted forest, fairy tale illustration", painted, "forward",
                        height_translation_per_step=border, width_translation_per_step=border, **walk)
    pil_to_video(zoom_in, saved(out / "inpaint_zoom_in.mp4"), fps=args.fps)
    pan = pipe.walk(["a mountain lake at sunrise", "a wooden pier on a lake"], painted, ["right", "left"],
                    height_translation_per_step=border, width_translation_per_step=border,
                    **{**walk, "num_inpainting_steps": 2})
    pil_to_video(pan, saved(out / "inpaint_pan.mp4"), fps=args.fps)


if __name__ == "__main__":
    main()
