"""Topology once: both backends build their networks from one plan (mlx_stablefused.topology).

Build-only checks (no forward pass): for every test configuration the MLX and torch modules expose the
same parameter names, with shapes equal modulo the layout contract the loaders implement, and for the
tiny ones those names are diffusers' / transformers' state_dict keys (through the loaders' key rules).
Then ControlNet's extension points: residuals enter the UNet (2D and 3D) exactly as in diffusers.
"""

import numpy as np
import pytest
import torch
from helpers import rel_error, report

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_stablefused import UnsupportedModelError
from mlx_stablefused.backends.mlx.weights import apply_weights, convert_state, torch_to_mlx_layout
from mlx_stablefused.backends.torch.loading import mlx_to_torch_layout
from mlx_stablefused.config import (AutoencoderTinyConfig, CLIPTextConfig, MotionConfig, UNet3DConfig, UNetConfig,
                                   VAEConfig)
from mlx_stablefused.demo import demo_configs
from mlx_stablefused.motion_adapters import MOTION_RULES
from mlx_stablefused.topology import unet3d_plan, unet_plan, vae_plan
from mlx_stablefused.model_description import AUTOENCODER_KL, CLIP_TEXT_MODEL, UNET_2D
from mlx_stablefused.weights import map_keys

from tiny_models import INPAINT_UNET, SD1, SD2, UNET3D

SD15_UNET: dict = {}  # diffusers' UNet2DConditionModel defaults are SD 1.x's
SD21_UNET = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                 upcast_attention=True, sample_size=96)
# SDXL's block layout without its added (text_time) conditioning: no attention in the first block,
# per-block transformer depth and heads. What the SDXL issue builds on.
SDXL_LAYOUT = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                        "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                   use_linear_projection=True)
TINY_SDXL_LAYOUT = dict(SDXL_LAYOUT, block_out_channels=(16, 32, 48), transformer_layers_per_block=(1, 2, 3),
                        attention_head_dim=(2, 4, 6), cross_attention_dim=24, norm_num_groups=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu")


def tiny_motion_adapter_config(use_mid_block: bool) -> dict:
    from tiny_models import build_motion_adapter

    return dict(build_motion_adapter(use_mid_block).config)


DEMO = demo_configs(vocab_size=300)

# (id, component, config, motion adapter config, tiny enough to build diffusers' model)
CASES = [
    ("sd1-unet", "unet", SD1.unet, None, True),
    ("sd2-unet", "unet", SD2.unet, None, True),
    ("inpaint-unet", "unet", INPAINT_UNET, None, True),
    ("sdxl-layout-unet-tiny", "unet", TINY_SDXL_LAYOUT, None, True),
    ("motion-unet", "unet", SD1.unet, "mid", True),
    ("motion-unet-no-mid", "unet", SD1.unet, "no-mid", True),
    ("unet3d", "unet3d", UNET3D, None, True),
    ("sd1-vae", "vae", SD1.vae, None, True),
    ("sd2-vae", "vae", SD2.vae, None, True),
    ("sd1-text", "text_encoder", SD1.text, None, True),
    ("sd2-text", "text_encoder", SD2.text, None, True),
    ("demo-unet", "unet", DEMO["unet"], None, True),
    ("demo-vae", "vae", DEMO["vae"], None, True),
    ("demo-text", "text_encoder", DEMO["text_encoder"], None, True),
    ("sd15-unet", "unet", SD15_UNET, None, False),
    ("sd21-unet", "unet", SD21_UNET, None, False),
    ("sdxl-layout-unet", "unet", SDXL_LAYOUT, None, False),
    ("sd15-vae", "vae", SD15_VAE, None, False),
    ("sd21-text", "text_encoder", SD21_TEXT, None, False),
    ("taesd-tiny", "tiny_vae", dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                    num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 2, 1, 1)), None, True),
    ("taesd", "tiny_vae", {}, None, True),  # diffusers' AutoencoderTiny defaults are TAESD's (about 2.4M parameters)
]
CASE_IDS = [c[0] for c in CASES]


def our_modules(component: str, raw: dict, motion: str | None):
    """The MLX module (lazy: nothing evaluated) and the torch one (on the meta device)."""
    from mlx_stablefused.backends.mlx import clip as mlx_clip, unet as mlx_unet, unet3d as mlx_unet3d, vae as mlx_vae
    from mlx_stablefused.backends.mlx import tiny_vae as mlx_tiny_vae
    from mlx_stablefused.backends.torch import (clip as torch_clip, tiny_vae as torch_tiny_vae, unet as torch_unet,
                                                unet3d as torch_unet3d, vae as torch_vae)

    if component == "unet":
        config = UNetConfig.from_dict(raw)
        adapter = None if motion is None else MotionConfig.from_dict(tiny_motion_adapter_config(motion == "mid"))
        build = (lambda m: m.UNet2DConditionModel(config, adapter)), (mlx_unet, torch_unet)
    else:
        parse, modules, name = {"unet3d": (UNet3DConfig, (mlx_unet3d, torch_unet3d), "UNet3DConditionModel"),
                                "vae": (VAEConfig, (mlx_vae, torch_vae), "AutoencoderKL"),
                                "tiny_vae": (AutoencoderTinyConfig, (mlx_tiny_vae, torch_tiny_vae), "AutoencoderTiny"),
                                "text_encoder": (CLIPTextConfig, (mlx_clip, torch_clip), "CLIPTextModel")}[component]
        config = parse.from_dict(raw)
        build = (lambda m: getattr(m, name)(config)), modules
    make, (mlx_module, torch_module) = build
    ours_mlx = make(mlx_module)
    with torch.device("meta"):
        ours_torch = make(torch_module)
    return ours_mlx, ours_torch


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mlx_and_torch_modules_expose_the_same_parameters(case):
    _, component, raw, motion, _ = case
    before = mx.get_active_memory()
    ours_mlx, ours_torch = our_modules(component, raw, motion)
    mlx_shapes = {k: tuple(v.shape) for k, v in tree_flatten(ours_mlx.parameters())}
    torch_shapes = {k: tuple(v.shape) for k, v in ours_torch.state_dict().items()}
    assert sorted(mlx_shapes) == sorted(torch_shapes)
    for name, tshape in torch_shapes.items():
        mshape = mlx_shapes[name]
        # the layout contract, through the loaders' own converters (lazy zeros / meta tensors: no memory)
        assert tuple(torch_to_mlx_layout(mx.zeros(tshape), mshape).shape) == mshape, name
        assert tuple(mlx_to_torch_layout(torch.empty(mshape, device="meta"), tshape).shape) == tshape, name
        if len(tshape) != len(mshape):  # only kernels change rank: 1x1 convs as Linear, frame convs as Conv1d
            assert tshape[2:] in ((1, 1), (3, 1, 1)), (name, tshape, mshape)
    # MLX builds lazily: even the full-size UNets (3.4 GB in float32) hold no memory until loaded
    assert mx.get_active_memory() - before < 32 * 2**20


def diffusers_state_keys(component: str, raw: dict, motion: str | None) -> set[str]:
    """The reference model's state_dict keys as the loaders map them onto our names."""
    import diffusers

    if component == "text_encoder":
        from transformers import CLIPTextConfig as HFConfig, CLIPTextModel

        return set(map_keys(CLIPTextModel(HFConfig(**raw)).state_dict(), CLIP_TEXT_MODEL.rules))
    if component == "vae":
        return set(map_keys(diffusers.AutoencoderKL(**raw).state_dict(), AUTOENCODER_KL.rules))
    if component == "unet3d":
        return set(diffusers.UNet3DConditionModel(**raw).state_dict())
    if component == "tiny_vae":
        return set(diffusers.AutoencoderTiny(**raw).state_dict())
    unet = diffusers.UNet2DConditionModel(**raw)
    if motion is None:
        return set(map_keys(unet.state_dict(), UNET_2D.rules))
    adapter = diffusers.MotionAdapter(**tiny_motion_adapter_config(motion == "mid"))
    return set(map_keys(diffusers.UNetMotionModel.from_unet2d(unet, adapter).state_dict(), MOTION_RULES))


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_parameter_names_are_the_reference_state_dict_keys(case):
    _, component, raw, motion, _ = case
    _, ours_torch = our_modules(component, raw, motion)
    assert set(ours_torch.state_dict()) == diffusers_state_keys(component, raw, motion)


# --- ControlNet's extension points -----------------------------------------------------------------------

def residual_shapes(plan, batch: int, h: int, w: int) -> tuple[list[tuple], tuple]:
    """NCHW shapes of every skip state (conv_in's first) and of the mid block's output."""
    shapes = [(batch, plan.base_channels, h, w)]
    for block in plan.down_blocks:
        shapes += [(batch, block.out_channels, h, w)] * len(block.resnets)
        if block.downsample:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, block.out_channels, h, w))
    return shapes, (batch, plan.mid_block.channels, h, w)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def reference_unet(request):
    from tiny_models import build_unet

    raw = {"sd1": SD1, "sd2": SD2}[request.param].unet
    return UNetConfig.from_dict(raw), build_unet(raw, seed=21)


def load_ours(backend: str, config, reference):
    """Our UNet (2D or 3D, as ``config``) with the reference's weights, through the loaders' key rules and
    layout converters."""
    import importlib

    module, name = ("unet3d", "UNet3DConditionModel") if isinstance(config, UNet3DConfig) else \
        ("unet", "UNet2DConditionModel")
    model = getattr(importlib.import_module(f"mlx_stablefused.backends.{backend}.{module}"), name)(config)
    state = reference.state_dict()
    if backend == "mlx":
        weights = convert_state(model, {k: mx.array(v.numpy()) for k, v in state.items()}, UNET_2D.rules)
        return apply_weights(model, weights, "unet")
    model.load_state_dict(map_keys(state, UNET_2D.rules))
    return model.eval()


def run_ours(backend: str, model, x, t, ctx, down=None, mid=None, num_frames=None):
    """Our UNet on numpy NCHW inputs; the MLX backend takes its residuals in its native NHWC."""
    if backend == "mlx":
        nhwc = lambda a: mx.array(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))  # noqa: E731
        out = model(nhwc(x), mx.array(t), mx.array(ctx), num_frames,
                    down_block_additional_residuals=None if down is None else [nhwc(r) for r in down],
                    mid_block_additional_residual=None if mid is None else nhwc(mid))
        return np.asarray(out).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(ctx), num_frames,
                     down_block_additional_residuals=None if down is None else [torch.from_numpy(r) for r in down],
                     mid_block_additional_residual=None if mid is None else torch.from_numpy(mid)).numpy()


def random_residuals(rng, plan, batch: int, size: tuple[int, int]) -> tuple[list[np.ndarray], np.ndarray]:
    down_shapes, mid_shape = residual_shapes(plan, batch, *size)
    return ([0.5 * rng.standard_normal(s).astype(np.float32) for s in down_shapes],
            0.5 * rng.standard_normal(mid_shape).astype(np.float32))


def reference_with(reference, x, t, ctx, down, mid) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' output with the residuals, and without (to show they matter)."""
    args = (torch.from_numpy(x), torch.tensor(t), torch.from_numpy(ctx))
    with torch.no_grad():
        return (reference(*args, down_block_additional_residuals=tuple(torch.from_numpy(r) for r in down),
                          mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy(),
                reference(*args).sample.numpy())


def test_controlnet_residuals_match_diffusers(reference_unet, backend_name):
    config, reference = reference_unet
    rng = np.random.default_rng(5)
    size = (9, 7)  # odd: the down path rounds up, the up path upsamples to the skips' sizes
    x = rng.standard_normal((2, 4, *size)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    down, mid = random_residuals(rng, unet_plan(config), 2, size)
    expected, plain = reference_with(reference, x, 321.0, ctx, down, mid)
    assert rel_error(plain, expected) > 1e-2  # the residuals matter at this scale
    got = run_ours(backend_name, load_ours(backend_name, config, reference), x, 321.0, ctx, down, mid)
    assert report(f"UNet + ControlNet residuals (rel) [{backend_name}]", rel_error(got, expected)) <= 1e-5


def test_unet3d_takes_residuals_as_diffusers(backend_name):
    from tiny_models import build_unet3d

    config, reference = UNet3DConfig.from_dict(UNET3D), build_unet3d(seed=12)
    rng = np.random.default_rng(7)
    b, f, size = 2, 3, (9, 7)
    video = rng.standard_normal((b, 4, f, *size)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, 32)).astype(np.float32)
    down, mid = random_residuals(rng, unet3d_plan(config), b * f, size)  # frames in the batch, frame-minor
    expected, plain = reference_with(reference, video, 321.0, ctx, down, mid)
    assert rel_error(plain, expected) > 1e-2
    frames = np.ascontiguousarray(video.transpose(0, 2, 1, 3, 4).reshape(b * f, 4, *size))
    got = run_ours(backend_name, load_ours(backend_name, config, reference), frames, 321.0,
                   np.repeat(ctx, f, axis=0), down, mid, num_frames=f)
    got = got.reshape(b, f, 4, *size).transpose(0, 2, 1, 3, 4)
    assert report(f"UNet3D + ControlNet residuals (rel) [{backend_name}]", rel_error(got, expected)) <= 1e-5


def test_residuals_that_do_not_fit_are_refused(reference_unet, backend_name):
    config, reference = reference_unet
    model = load_ours(backend_name, config, reference)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    down_shapes, mid_shape = residual_shapes(unet_plan(config), 1, 8, 8)
    down = [np.zeros(s, np.float32) for s in down_shapes]
    mid = np.zeros(mid_shape, np.float32)
    with pytest.raises(ValueError, match="go together"):
        run_ours(backend_name, model, x, 0.0, ctx, down=down)
    with pytest.raises(ValueError, match="go together"):
        run_ours(backend_name, model, x, 0.0, ctx, mid=mid)
    with pytest.raises(ValueError, match=rf"expected {len(down)} tensors"):
        run_ours(backend_name, model, x, 0.0, ctx, down=down[:-1], mid=mid)
    with pytest.raises(ValueError, match="mid_block_additional_residual: expected"):
        run_ours(backend_name, model, x, 0.0, ctx, down=down, mid=np.zeros((1, 3, 2, 2), np.float32))


def test_odd_configs_are_refused_when_the_plan_is_made():
    adapter = MotionConfig.from_dict(dict(tiny_motion_adapter_config(True), motion_num_attention_heads=3))
    with pytest.raises(UnsupportedModelError, match="motion_num_attention_heads"):
        unet_plan(UNetConfig.from_dict(SD1.unet), adapter)
    wrong = MotionConfig.from_dict(dict(tiny_motion_adapter_config(True), block_out_channels=(16, 32, 48)))
    with pytest.raises(UnsupportedModelError, match="channels"):
        unet_plan(UNetConfig.from_dict(SD1.unet), wrong)


@pytest.mark.parametrize("make,field", [
    (lambda: unet_plan(UNetConfig.from_dict(dict(SD1.unet, layers_per_block=(2, 0, 2)))), "layers_per_block"),
    (lambda: unet_plan(UNetConfig.from_dict(dict(SD2.unet, transformer_layers_per_block=(1, 0, 1)))),
     "transformer_layers_per_block"),
    (lambda: unet3d_plan(UNet3DConfig.from_dict(dict(UNET3D, layers_per_block=0))), "layers_per_block"),
    (lambda: vae_plan(VAEConfig.from_dict(dict(SD1.vae, layers_per_block=0))), "layers_per_block"),
], ids=["unet", "unet-transformer", "unet3d", "vae"])
def test_empty_blocks_are_refused_naming_the_field(make, field):
    with pytest.raises(UnsupportedModelError, match=rf"{field}=\["):
        make()


def test_plan_keeps_per_block_transformer_depth_and_heads():
    plan = unet_plan(UNetConfig.from_dict(SDXL_LAYOUT))
    assert [b.attention for b in plan.down_blocks][0] is None
    assert [(b.attention.layers, b.attention.heads) for b in plan.down_blocks[1:]] == [(2, 10), (10, 20)]
    assert [(b.attention.layers, b.attention.heads) for b in plan.up_blocks[:2]] == [(10, 20), (2, 10)]
    assert plan.up_blocks[2].attention is None
    assert (plan.mid_block.attention.layers, plan.mid_block.attention.heads) == (10, 20)
    # diffusers' skip bookkeeping: the up path takes every skip the down path leaves, finest last
    assert sum((b.skip_channels for b in plan.up_blocks), ()) == plan.skip_channels[::-1]


SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@pytest.mark.parametrize("vae,height,width", [(SD1.vae, 64, 40), (SD1.vae, 24, 72), (SD15_VAE, 32, 48)],
                         ids=["sd1-tiny-64x40", "sd1-tiny-24x72", "sd15-32x48"])
def test_largest_map_is_the_largest_module_output_in_diffusers(vae, height, width):
    """The plan's largest feature map (the VAE's CPU run-ahead bound scales with it) is the largest output of any
    module of diffusers' AutoencoderKL, per sample, on the same input: in the encoder and in the decoder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**vae).eval()
    plan = vae_plan(VAEConfig.from_dict(vae))
    seen = {"encoder": 0, "decoder": 0}

    def watch(part):
        def hook(module, inputs, output):
            for t in (output if isinstance(output, tuple) else (output,)) + tuple(inputs):
                if isinstance(t, torch.Tensor):
                    seen[part] = max(seen[part], t[0].numel())
        return hook

    for part in seen:
        for module in getattr(model, part).modules():
            module.register_forward_hook(watch(part))
    with torch.inference_mode():
        latent = model.encode(torch.randn(2, 3, height, width)).latent_dist.mean
        model.decode(latent)
    assert latent.shape[2:] == (height // 8, width // 8)
    assert plan.encoder.largest_map(height, width) == seen["encoder"]
    assert plan.decoder.largest_map(height // 8, width // 8) == seen["decoder"]
