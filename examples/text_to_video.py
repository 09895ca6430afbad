"""Text to video with an AnimateDiff motion adapter: one video, then a batch of two (gif and mp4, 8 fps).

Mirrors stablefused's text_to_video_diffusion notebook (which used a ModelScope UNet3D model; here
the motion comes from AnimateDiff on any SD 1.5 model).

    python examples/text_to_video.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --motion-adapter guoyww/animatediff-motion-adapter-v1-5-2
"""

from functools import partial

from _common import defaults, parser, saved, setup

from mlx_stablefused import TextToVideoDiffusion, pil_to_gif, pil_to_video
from mlx_stablefused.cli import DEFAULT_MOTION_ADAPTER, default_model
from mlx_stablefused.demo import DEMO_MODEL_ID, DEMO_MOTION_ADAPTER_ID, DEMO_STEPS
from mlx_stablefused.cli_values import positive


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--motion-adapter", default=None)
    p.add_argument("--frames", type=positive("--frames"), default=None,
                   help="video frames (default: 16; 8 on the demo model)")
    defaults(p, frames=(16, 8), steps=(25, DEMO_STEPS))
    args = p.parse_args()
    args.model = args.model or default_model(None)
    adapter = args.motion_adapter or (DEMO_MOTION_ADAPTER_ID if args.model == DEMO_MODEL_ID else DEFAULT_MOTION_ADAPTER)
    pipe, out = setup(args, partial(TextToVideoDiffusion, motion_adapter=adapter))
    common = dict(video_height=args.size, video_width=args.size, video_frames=args.frames,
                  num_inference_steps=args.steps, negative_prompt="bad quality, worse quality", seed=args.seed)
    video = pipe("a corgi running on a beach at sunset, high quality", guidance_scale=7.5, **common)[0]
    pil_to_gif(video, saved(out / "text_to_video.gif"), fps=args.fps)
    pil_to_video(video, saved(out / "text_to_video.mp4"), fps=args.fps)
    batch = pipe(["fireworks over a city at night", "a jellyfish drifting in deep blue water"],
                 guidance_scale=8.0, **common)
    for i, frames in enumerate(batch):
        pil_to_video(frames, saved(out / f"text_to_video_batch_{i}.mp4"), fps=args.fps)


if __name__ == "__main__":
    main()
