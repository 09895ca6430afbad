"""Convert a Stable Diffusion model (hub id or diffusers folder) to an MLX folder.

    python convert/convert_sd.py stable-diffusion-v1-5/stable-diffusion-v1-5 ./sd15-mlx --dtype float16

The same as ``mlx-stablefused convert``; this file only forwards to it.
"""

import sys

from mlx_stablefused.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
