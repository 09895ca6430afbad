"""Latent walks: similar images around one latent, and a story video interpolating between prompts.

Mirrors stablefused's latent_walk_diffusion notebook.

    python examples/latent_walk.py --model stable-diffusion-v1-5/stable-diffusion-v1-5
"""

import numpy as np
from _common import defaults, parser, saved, setup

from mlx_stablefused import LatentWalkDiffusion, image_grid, pil_to_video
from mlx_stablefused.cli_values import positive

STORY = [
    "a small boat leaving a harbour at dawn, watercolor",
    "a small boat on a stormy sea, watercolor",
    "a small boat reaching a tropical island, watercolor",
    "a campfire on a tropical beach at night, watercolor",
]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--frames", type=positive("--frames"), default=None,
                   help="frames between consecutive prompts (default: 16; 4 on the demo model)")
    p.add_argument("--similar", type=positive("--similar"), default=None,
                   help="number of similar images (default: 4; 2 on the demo model)")
    defaults(p, frames=(16, 4), similar=(4, 2))
    args = p.parse_args()
    pipe, out = setup(args, LatentWalkDiffusion)
    f = pipe.vae_scale_factor
    latent = np.random.default_rng(args.seed).standard_normal((1, pipe.latent_channels, args.size // f,
                                                               args.size // f)).astype(np.float32)
    similar = pipe("a red vintage car parked by the sea", np.repeat(latent, args.similar, axis=0), strength=0.2,
                   num_inference_steps=args.steps, seed=args.seed)
    image_grid(similar, rows=1, cols=len(similar)).save(saved(out / "latent_walk_similar.png"))

    frames = pipe.interpolate(STORY, image_height=args.size, image_width=args.size, num_inference_steps=args.steps,
                              interpolation_steps=args.frames, negative_prompt="text, watermark", seed=args.seed)
    pil_to_video(frames, saved(out / "latent_walk_story.mp4"), fps=args.fps)


if __name__ == "__main__":
    main()
