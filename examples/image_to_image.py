"""Image to image, and a video of its denoising process.

Mirrors stablefused's image_to_image_diffusion notebook. Without --image, a first image is made
with text-to-image from the same model.

    python examples/image_to_image.py --image astronaut.png --start-step 8
"""

from _common import parser, saved, setup

from mlx_stablefused import ImageToImageDiffusion, TextToImageDiffusion, image_grid, pil_to_video
from mlx_stablefused.cli_values import non_negative


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--image", default=None)
    p.add_argument("--start-step", type=non_negative("--start-step"), default=None, help="default: a third of --steps")
    args = p.parse_args()
    pipe, out = setup(args, ImageToImageDiffusion)
    image = args.image
    if image is None:
        t2i = TextToImageDiffusion.from_pipeline(pipe)  # shares the loaded weights
        image = t2i("a renaissance painting of an astronaut", image_height=args.size, image_width=args.size,
                    num_inference_steps=args.steps, seed=args.seed)[0]
        image.save(saved(out / "image_to_image_input.png"))
    start = args.start_step if args.start_step is not None else args.steps // 3
    prompts = ["a renaissance painting of an astronaut, golden hour", "an astronaut, ukiyo-e woodblock print"]
    results = pipe(image, prompts, num_inference_steps=args.steps, start_step=start, guidance_scale=12.0,
                   negative_prompt="blurry, low quality", seed=args.seed, image_height=args.size,
                   image_width=args.size)
    image_grid(results, rows=1, cols=len(results)).save(saved(out / "image_to_image.png"))

    history = pipe(image, prompts[0], num_inference_steps=args.steps, start_step=start, guidance_scale=12.0,
                   seed=args.seed, image_height=args.size, image_width=args.size, return_latent_history=True)
    pil_to_video(history[0], saved(out / "image_to_image_denoising.mp4"), fps=args.fps)


if __name__ == "__main__":
    main()
