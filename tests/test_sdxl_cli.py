"""The command line on SDXL models: the same subcommands, SDXL flags, the UNet's default size, and bad input."""

import numpy as np
import pytest
from PIL import Image
from test_parity_image_pipelines import make_image

from mlx_stablefused import ImageToImageDiffusion, TextToImageDiffusion
from mlx_stablefused.cli import main

FAST = ["--steps", "2", "--no-progress", "--seed", "5"]
SDXL_FLAGS = ["--prompt-2", "at night", "--original-size", "96", "80", "--crops-coords-top-left", "8", "16",
              "--target-size", "72", "48", "--negative-prompt", "blurry"]


def test_sdxl_txt2img_and_refiner_img2img_write_what_the_api_makes(sdxl, sdxl_refiner, tmp_path):
    out = tmp_path / "sdxl.png"
    assert main(["txt2img", "--model", str(sdxl[1]), "--prompt", "a lighthouse", "--output", str(out), *FAST,
                 *SDXL_FLAGS]) == 0
    assert Image.open(out).size == (64, 64)  # the UNet's sample_size (8) x 8, not 512
    api = TextToImageDiffusion(sdxl[1], progress=False)("a lighthouse", num_inference_steps=2, seed=5,
                                                        negative_prompt="blurry", prompt_2="at night",
                                                        original_size=(96, 80), crops_coords_top_left=(8, 16),
                                                        target_size=(72, 48))[0]
    assert np.abs(np.asarray(Image.open(out), float) - np.asarray(api, float)).max() <= 1
    source, refined = tmp_path / "in.png", tmp_path / "refined.png"
    make_image().save(source)
    assert main(["img2img", "--model", str(sdxl_refiner[1]), "--image", str(source), "--prompt", "a lighthouse",
                 "--strength", "0.5", "--aesthetic-score", "7", "--output", str(refined), *FAST]) == 0
    api = ImageToImageDiffusion(sdxl_refiner[1], progress=False)(str(source), "a lighthouse", num_inference_steps=2,
                                                                 strength=0.5, aesthetic_score=7.0, seed=5)[0]
    assert np.abs(np.asarray(Image.open(refined), float) - np.asarray(api, float)).max() <= 1
    converted = tmp_path / "refiner-mlx"  # convert keeps the description the model index names
    assert main(["convert", str(sdxl_refiner[1]), str(converted), "--dtype", "float32"]) == 0
    again = ImageToImageDiffusion(converted, progress=False)(str(source), "a lighthouse", num_inference_steps=2,
                                                           strength=0.5, aesthetic_score=7.0, seed=5)[0]
    assert np.array_equal(np.asarray(again), np.asarray(api))


@pytest.mark.parametrize("model,argv,message", [
    ("refiner", [], "refiner (requires_aesthetics_score in its model_index.json): it refines an image"),
    ("sdxl", ["--original-size", "0", "64"], "--original-size must be a positive integer, got 0"),
    ("sdxl", ["--crops-coords-top-left", "-1", "0"], "--crops-coords-top-left must be a non-negative integer"),
    ("sd1", ["--prompt-2", "x", "--target-size", "64", "64"], "--prompt-2, --target-size: only SDXL models take these"),
])
def test_sdxl_bad_input_exits_1_naming_it(sdxl, sdxl_refiner, sd1, tmp_path, capsys, model, argv, message):
    root = {"sdxl": sdxl, "refiner": sdxl_refiner, "sd1": sd1}[model][1]
    out = tmp_path / "x.png"
    assert main(["txt2img", "--model", str(root), "--prompt", "x", "--output", str(out), *FAST, *argv]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sdxl_pair_flags_take_two_numbers(sdxl, tmp_path):
    with pytest.raises(SystemExit) as e:  # a usage error, as argparse reports any wrong argument count
        main(["txt2img", "--model", str(sdxl[1]), "--prompt", "x", "--output", str(tmp_path / "x.png"),
              "--target-size", "64"])
    assert e.value.code == 2


def test_every_sdxl_flag_reaches_its_diffusers_keyword():
    """Each SDXL flag of the generating subcommands maps to the keyword diffusers names (the run above and the
    API tests cover what the keywords do); the aesthetic scores belong to the image subcommands only."""
    from mlx_stablefused.cli import build_parser
    from mlx_stablefused.cli_sdxl import sdxl_keywords

    common = ["--prompt-2", "p2", "--negative-prompt-2", "n2", "--original-size", "96", "80",
              "--negative-original-size", "64", "48", "--crops-coords-top-left", "8", "16",
              "--negative-crops-coords-top-left", "0", "4", "--target-size", "72", "48",
              "--negative-target-size", "40", "32"]
    expected = dict(prompt_2="p2", negative_prompt_2="n2", original_size=(96, 80), negative_original_size=(64, 48),
                    crops_coords_top_left=(8, 16), negative_crops_coords_top_left=(0, 4), target_size=(72, 48),
                    negative_target_size=(40, 32))
    scores = ["--aesthetic-score", "7", "--negative-aesthetic-score", "1.5"]
    inputs = {"txt2img": [], "img2img": ["--image", "in.png"], "inpaint": ["--image", "in.png", "--mask", "m.png"]}
    parser = build_parser()
    for command, required in inputs.items():
        image = command != "txt2img"
        args = parser.parse_args([command, "--model", "m", "--prompt", "x", *required, *common,
                                  *(scores if image else [])])
        assert sdxl_keywords(args) == {**expected, **(dict(aesthetic_score=7.0, negative_aesthetic_score=1.5)
                                                      if image else {})}, command
        assert sdxl_keywords(parser.parse_args([command, "--model", "m", "--prompt", "x", *required])) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["txt2img", "--model", "m", "--prompt", "x", *scores])
