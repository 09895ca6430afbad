"""An image as a prompt (IP-Adapter): one reference image steering text-to-image at several scales.

Not a stablefused notebook (stablefused has no IP-Adapter): diffusers' IP-Adapter guide in this port.
Without --image, the reference is made with text-to-image from the same model. The adapter defaults to
h94/IP-Adapter's SD 1.5 one (its ViT-H image encoder comes with it); on the demo model, a random demo
adapter.

    python examples/ip_adapter.py --image cat.png
"""

from _common import parser, saved, setup

from mlx_stablefused import TextToImageDiffusion, image_grid, write_text_on_image
from mlx_stablefused.cli_ip_adapter import adapter_location
from mlx_stablefused.cli_values import finite
from mlx_stablefused.demo import DEMO_IP_ADAPTER_ID, DEMO_MODEL_ID

HUB_ADAPTER = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--image", default=None, help="the reference image (default: one made from a prompt)")
    p.add_argument("--ip-adapter", default=None, help=f"adapter file, folder or hub file (default: {HUB_ADAPTER}; "
                                                      f"on the demo model {DEMO_IP_ADAPTER_ID})")
    p.add_argument("--scales", type=finite("--scales"), nargs="+", default=[0.0, 0.3, 0.6, 1.0])
    args = p.parse_args()
    pipe, out = setup(args, TextToImageDiffusion)
    image = args.image
    if image is None:
        image = pipe("a tabby cat sitting on a windowsill, photograph", image_height=args.size, image_width=args.size,
                     num_inference_steps=args.steps, seed=args.seed)[0]
        image.save(saved(out / "ip_adapter_reference.png"))
    demo = pipe.source.origin == DEMO_MODEL_ID
    source, keywords = adapter_location(args.ip_adapter or (DEMO_IP_ADAPTER_ID if demo else HUB_ADAPTER))
    pipe.load_ip_adapter(source, **keywords)

    # Scale 0 is the text prompt alone; higher scales let the image prompt count for more.
    results = []
    for scale in args.scales:
        pipe.set_ip_adapter_scale(scale)
        result = pipe("a painting in the style of van gogh", negative_prompt="blurry, low quality",
                      image_height=args.size, image_width=args.size, num_inference_steps=args.steps,
                      seed=args.seed, ip_adapter_image=image)[0]
        results.append(write_text_on_image(result, f"scale {scale:g}", fontsize=max(10, args.size // 16)))
    image_grid(results, rows=1, cols=len(results)).save(saved(out / "ip_adapter_scales.png"))


if __name__ == "__main__":
    main()
