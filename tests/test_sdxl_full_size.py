"""Full-size SDXL base and refiner UNets (2.6 B / 2.3 B parameters): our MLX (lazy) and torch (meta device)
modules expose exactly diffusers' parameter names and shapes, add_embedding included. No weights are
materialised; diffusers' constructor alone takes ~20 s, so this runs with ``pytest -m slow``."""

import pytest
import torch
from test_topology import SDXL_LAYOUT, our_modules

pytestmark = pytest.mark.slow

SDXL_BASE_UNET = dict(SDXL_LAYOUT, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816, addition_embed_type_num_heads=64, sample_size=128)
SDXL_REFINER_UNET = dict(
    block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560, addition_embed_type_num_heads=64, sample_size=128)


@pytest.mark.parametrize("config", [SDXL_BASE_UNET, SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_full_size_sdxl_unets_have_diffusers_parameters(config):
    import diffusers
    from mlx.utils import tree_flatten

    ours_mlx, ours_torch = our_modules("unet", config, None)
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours_torch.state_dict().items()} == expected
    assert sorted(k for k, _ in tree_flatten(ours_mlx.parameters())) == sorted(expected)
    assert expected["add_embedding.linear_1.weight"][1] == config["projection_class_embeddings_input_dim"]
