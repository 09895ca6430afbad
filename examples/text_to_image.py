"""Text to image, and a video of the denoising process for four prompts as a 2x2 grid.

Mirrors stablefused's text_to_image_diffusion notebook.

    python examples/text_to_image.py --model stable-diffusion-v1-5/stable-diffusion-v1-5
"""

from _common import parser, saved, setup

from mlx_stablefused import TextToImageDiffusion, image_grid, pil_to_video, write_text_on_image

PROMPTS = [
    "a photograph of an astronaut riding a horse, highly detailed",
    "a lighthouse on a cliff at dusk, oil painting",
    "a cozy cabin in a snowy forest, warm light in the windows",
    "portrait of a fox wearing a scarf, studio lighting",
]


def main() -> None:
    args = parser(__doc__).parse_args()
    pipe, out = setup(args, TextToImageDiffusion)
    image = pipe(PROMPTS[0], negative_prompt="blurry, low quality", image_height=args.size, image_width=args.size,
                 num_inference_steps=args.steps, seed=args.seed)[0]
    image.save(saved(out / "text_to_image.png"))

    # Every intermediate latent decoded: history[p][k] is prompt p after k steps.
    history = pipe(PROMPTS, image_height=args.size, image_width=args.size, num_inference_steps=args.steps,
                   seed=args.seed, return_latent_history=True)
    frames = []
    for k in range(len(history[0])):
        frame = image_grid([row[k] for row in history], rows=2, cols=2)
        frames.append(write_text_on_image(frame, f"step {k}/{args.steps}", fontsize=max(10, args.size // 16)))
    pil_to_video(frames, saved(out / "text_to_image_denoising.mp4"), fps=args.fps)


if __name__ == "__main__":
    main()
