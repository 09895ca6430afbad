"""The effect of guidance scale: a grid from -1.5 to 15 across prompts, and across step counts.

Mirrors stablefused's effect_of_guidance_scale notebook. Negative and zero scales are allowed:
0 is the unconditional image, negative pushes away from the prompt.

    python examples/guidance_scale.py --model stable-diffusion-v1-5/stable-diffusion-v1-5
"""

import numpy as np
from _common import defaults, parser, saved, setup

from mlx_stablefused import TextToImageDiffusion, image_grid, write_text_on_image
from mlx_stablefused.cli_values import finite, positive

SCALES = [-1.5, 0.0, 1.0, 3.0, 7.5, 12.0, 15.0]
PROMPTS = ["a bowl of ramen, food photography", "a castle on a hill, matte painting"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--step-counts", type=positive("--step-counts"), nargs="+", default=None,
                   help="step counts of the second grid (default: 10 20 30; 2 4 8 on the demo model)")
    p.add_argument("--scales", type=finite("--scales"), nargs="+", default=SCALES)
    defaults(p, step_counts=([10, 20, 30], [2, 4, 8]))
    args = p.parse_args()
    pipe, out = setup(args, TextToImageDiffusion)
    f = pipe.vae_scale_factor
    noise = np.random.default_rng(args.seed).standard_normal((1, pipe.latent_channels, args.size // f,
                                                              args.size // f)).astype(np.float32)
    label = max(10, args.size // 16)

    def cell(prompt: str, scale: float, steps: int):
        image = pipe(prompt, latent=noise, guidance_scale=scale, num_inference_steps=steps)[0]
        return write_text_on_image(image, f"g={scale} steps={steps}", fontsize=label)

    rows = [[cell(prompt, s, args.steps) for s in args.scales] for prompt in PROMPTS]
    image_grid([c for row in rows for c in row], len(rows), len(args.scales)).save(
        saved(out / "guidance_scale_prompts.png"))
    rows = [[cell(PROMPTS[0], s, n) for s in args.scales] for n in args.step_counts]
    image_grid([c for row in rows for c in row], len(rows), len(args.scales)).save(
        saved(out / "guidance_scale_steps.png"))


if __name__ == "__main__":
    main()
