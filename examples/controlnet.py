"""ControlNet: steer text-to-image with the canny edges of an image, at several strengths and over part of the
schedule, and image-to-image with the same edges.

Without --image, a first image is made with text-to-image from the same model; its edges (OpenCV's Canny, the
controlnet extra) become the control image. On a real SD 1.5 model the ControlNet defaults to
lllyasviel/control_v11p_sd15_canny; on the offline demo model to the random demo ControlNet (noise, but every
step runs).

    python examples/controlnet.py --image house.png --controlnet lllyasviel/control_v11p_sd15_canny
"""

from _common import parser, saved, setup
from PIL import Image

from mlx_stablefused import ImageToImageDiffusion, TextToImageDiffusion, canny_image, image_grid
from mlx_stablefused.cli_values import non_negative
from mlx_stablefused.demo import DEMO_CONTROLNET_ID, DEMO_MODEL_ID

DEFAULT_CONTROLNET = "lllyasviel/control_v11p_sd15_canny"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--image", default=None, help="the image whose edges steer the generation")
    p.add_argument("--controlnet", default=None, help=f"ControlNet folder, hub id or file (default: {DEFAULT_CONTROLNET}; "
                                                      f"{DEMO_CONTROLNET_ID} on the demo model)")
    p.add_argument("--canny", type=non_negative("--canny"), nargs=2, default=(100, 200), metavar=("LOW", "HIGH"))
    args = p.parse_args()
    pipe, out = setup(args, TextToImageDiffusion)
    controlnet = args.controlnet or (DEMO_CONTROLNET_ID if pipe.model_id == DEMO_MODEL_ID else DEFAULT_CONTROLNET)
    size = dict(image_height=args.size, image_width=args.size)
    image = args.image
    if image is None:
        image = pipe("a small house by a lake, oil painting", num_inference_steps=args.steps, seed=args.seed, **size)[0]
        image.save(saved(out / "controlnet_input.png"))
    source = (Image.open(image).convert("RGB") if isinstance(image, str) else image).resize((args.size, args.size))
    edges = canny_image(source, *args.canny)  # a control image has the output's size
    edges.save(saved(out / "controlnet_canny.png"))

    pipe.set_controlnet(controlnet)  # the base model stays loaded; set_controlnet(None) drops it
    prompt = "a futuristic glass house by a lake, night, neon"
    scales = [0.0, 0.5, 1.0]
    results = [pipe(prompt, control_image=edges, controlnet_conditioning_scale=s, num_inference_steps=args.steps,
                    seed=args.seed, negative_prompt="blurry, low quality")[0] for s in scales]
    # The edges steer only the first half of the schedule: the layout follows them, the details are free.
    results.append(pipe(prompt, control_image=edges, control_guidance_end=0.5, num_inference_steps=args.steps,
                        seed=args.seed, negative_prompt="blurry, low quality")[0])
    image_grid(results, rows=1, cols=len(results)).save(saved(out / "controlnet.png"))

    img2img = ImageToImageDiffusion.from_pipeline(pipe)  # shares the weights; the ControlNet is passed again
    img2img.set_controlnet(pipe.controlnet)
    edited = img2img(source, prompt, control_image=edges, strength=0.7, num_inference_steps=args.steps,
                     seed=args.seed)[0]
    edited.save(saved(out / "controlnet_img2img.png"))


if __name__ == "__main__":
    main()
