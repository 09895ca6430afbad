"""Full-size SDXL base and refiner UNets (2.6 B / 2.3 B parameters): our MLX (lazy) and torch (meta device)
modules expose exactly diffusers' parameter names and shapes, add_embedding included (no weights
materialised; diffusers' constructor alone takes ~20 s); and the base UNet's numbers at 16x16 latents, fp32,
on both backends against diffusers' (~3 min, 10.3 GB of weights). ``pytest -m slow``."""

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


# Max abs error of the full base UNet's output (|values| up to 1.1) vs diffusers: measured 5.0e-6 on MLX (its own
# GEMM blocking, base-2 softmax and BLAS GroupNorm sums: float32 rounding through 70 transformer blocks) and 0 on
# the torch backend (diffusers' very ops); 1e-4 leaves 20x over the rounding, while a wrong operation (a time id
# dropped, a head count or norm group off) moves outputs by 1e-2 or more.
TOLERANCE = 1e-4


def test_full_size_sdxl_base_unet_matches_diffusers_at_16x16_latents():
    """The full SDXL base UNet (2.6 B parameters, fp32, diffusers' seeded random init) at 16x16 latents, batch 2,
    text_time conditioning with non-default micro-conditioning, on both backends vs diffusers.

    Memory: the fp32 weights are 10.3 GB and held once: diffusers' module runs first, our torch module then
    takes its very tensors (``load_state_dict(assign=True)``), and the MLX module is filled tensor by tensor,
    each torch tensor freed as its MLX copy is made (~3 min here, under 11 GB)."""
    import gc

    import diffusers
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from helpers import max_abs_error, report

    from mlx_stablefused.backends.mlx.weights import torch_to_mlx_layout

    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**SDXL_BASE_UNET).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 2048)).astype(np.float32)
    text_embeds = rng.standard_normal((2, 1280)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1152, 32, 64, 896, 1024]], np.float32)
    t = 601.0
    torch_in = dict(encoder_hidden_states=torch.from_numpy(ctx), added_cond_kwargs={
        "text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)})
    with torch.no_grad():
        want = reference(torch.from_numpy(x), t, **torch_in).sample.numpy()
    scale = float(np.abs(want).max())

    ours_mlx, ours_torch = our_modules("unet", SDXL_BASE_UNET, None)
    ours_torch.load_state_dict(reference.state_dict(), assign=True, strict=True)  # the same storages: no copy
    del reference
    gc.collect()
    with torch.no_grad():
        got_torch = ours_torch(torch.from_numpy(x), torch.tensor(t), torch_in["encoder_hidden_states"],
                               added_cond_kwargs=torch_in["added_cond_kwargs"]).numpy()
    torch_error = report("full SDXL base UNet, 16x16 latents, torch backend", max_abs_error(got_torch, want))

    shapes = {k: tuple(v.shape) for k, v in tree_flatten(ours_mlx.parameters())}
    state = ours_torch.state_dict()
    del ours_torch
    gc.collect()
    weights = []
    for name in list(state):
        value = torch_to_mlx_layout(mx.array(state.pop(name).numpy()), shapes[name])
        mx.eval(value)  # materialised now, so the torch tensor just dropped is the only copy freed
        weights.append((name, value))
    ours_mlx.update(tree_unflatten(weights))
    del weights
    got_mlx = ours_mlx(mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(ctx), added_cond_kwargs={
        "text_embeds": mx.array(text_embeds), "time_ids": mx.array(time_ids)})
    got_mlx = np.asarray(got_mlx).transpose(0, 3, 1, 2)
    mlx_error = report("full SDXL base UNet, 16x16 latents, MLX backend", max_abs_error(got_mlx, want))
    assert np.isfinite(want).all() and scale > 0.1
    assert mlx_error < TOLERANCE and torch_error < TOLERANCE
