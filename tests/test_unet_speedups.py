"""DeepCache and ToMe token merging, both backends: against the DeepCache package's ``DeepCacheSDHelper`` and
tomesd's ``apply_patch`` on the same diffusers pipeline, tomesd's own merge functions, and exact when off."""

import numpy as np
import pytest
import torch
from helpers import BACKENDS, diffusers_pipeline, max_abs_error, rel_error, report

from mlx_stablefused import TextToImageDiffusion, TextToVideoDiffusion
from mlx_stablefused.deep_cache import DeepCacheConfig, DeepCacheRun
from mlx_stablefused.token_merging import destination_partition

NOISE = np.random.default_rng(11).standard_normal((1, 4, 8, 8)).astype(np.float32)
RUN = dict(prompt="a lighthouse", negative_prompt="fog", num_inference_steps=4, guidance_scale=7.5)
# The package comparisons run on torch by default (a tiny torch run costs a fifth of an MLX one); MLX is held to
# torch by default below and to the packages with -m slow.
TORCH_DEFAULT = ["torch", pytest.param("mlx", marks=pytest.mark.slow)]
DEEPCACHE_CASES = [(3, 0), (2, 4)]  # (interval, branch): the shallowest branch, and one inside a down block
TOME_CASES = [dict(ratio=0.5, use_rand=False),
              dict(ratio=0.4, use_rand=False, max_downsample=2, merge_crossattn=True, merge_mlp=True)]


@pytest.fixture(scope="module")
def references(sd1):
    """diffusers' DDIM latents on the tiny SD1 model: exact, with DeepCacheSDHelper and with tomesd (once). Both
    patch the UNet's modules (DeepCacheSDHelper.disable leaves its block wrappers), so they get a copy."""
    import copy

    import diffusers
    import tomesd
    from DeepCache import DeepCacheSDHelper

    pipe = diffusers_pipeline(sd1[0], scheduler=diffusers.DDIMScheduler.from_config(sd1[0].scheduler.config))
    pipe.unet = copy.deepcopy(pipe.unet)

    def run() -> np.ndarray:
        with torch.no_grad():
            return pipe(height=64, width=64, latents=torch.from_numpy(NOISE), output_type="latent", **RUN).images.numpy()

    out = {"exact": run()}
    for interval, branch in DEEPCACHE_CASES:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        out[("deepcache", interval, branch)] = run()
        helper.disable()
    for i, options in enumerate(TOME_CASES):
        tomesd.apply_patch(pipe, **options)
        out[("tome", i)] = run()
        tomesd.remove_patch(pipe)
    return out


def _pipe(pipelines, sd1, backend_name, scheduler="ddim"):
    return pipelines.pipeline(TextToImageDiffusion, sd1[1], backend_name, scheduler=scheduler)


def _latents(pipe) -> np.ndarray:
    return pipe(image_height=64, image_width=64, latent=NOISE, output_type="latent", **RUN)


@pytest.mark.parametrize("backend_name", TORCH_DEFAULT)
def test_deepcache_matches_the_deepcache_package_and_is_exact_when_off(sd1, pipelines, references, backend_name):
    pipe = _pipe(pipelines, sd1, backend_name)
    exact = _latents(pipe)
    assert max_abs_error(exact, references["exact"]) < 1e-4
    for interval, branch in DEEPCACHE_CASES:
        pipe.enable_deepcache(interval=interval, branch=branch)
        cached, again = _latents(pipe), _latents(pipe)
        theirs = references[("deepcache", interval, branch)]
        assert max_abs_error(theirs, references["exact"]) > 1e-3  # the cache changes the result measurably
        assert report(f"DeepCache vs the DeepCache package's DeepCacheSDHelper, CFG, DDIM (max abs latent) "
                      f"[{backend_name}]", max_abs_error(cached, theirs)) < 1e-4
        assert np.array_equal(cached, again)  # each generation starts with an empty cache
    pipe.enable_deepcache(interval=1, branch=3)
    assert max_abs_error(_latents(pipe), exact) == 0  # every evaluation full: the exact path, bit for bit
    pipe.disable_deepcache()
    assert np.array_equal(_latents(pipe), exact)


@pytest.mark.parametrize("backend_name", TORCH_DEFAULT)
def test_token_merging_matches_tomesd_and_is_exact_at_ratio_0_and_off(sd1, pipelines, references, backend_name):
    pipe = _pipe(pipelines, sd1, backend_name)
    exact = _latents(pipe)
    for i, options in enumerate(TOME_CASES):
        pipe.enable_token_merging(**options)
        theirs = references[("tome", i)]
        assert max_abs_error(theirs, references["exact"]) > 1e-2
        assert report(f"ToMe vs tomesd.apply_patch on diffusers, use_rand=False, CFG (max abs latent) [{backend_name}]",
                      max_abs_error(_latents(pipe), theirs)) < 1e-4
    pipe.enable_token_merging(ratio=0.0)
    assert np.array_equal(_latents(pipe), exact)
    pipe.disable_token_merging()
    assert np.array_equal(_latents(pipe), exact)


def test_merge_and_unmerge_match_tomesd_functions():
    """Our torch and MLX bipartite soft matching vs tomesd's on the same tokens (no randomness, odd grid too).
    tomesd orders tokens within its destination set by torch's unstable argsort, so merged tokens are compared
    as sets, and unmerge after a per-token function, which no order changes."""
    import mlx.core as mx
    from tomesd.merge import bipartite_soft_matching_random2d

    from mlx_stablefused.backends.mlx.token_merge import bipartite_soft_matching as mlx_matching
    from mlx_stablefused.backends.torch.token_merge import bipartite_soft_matching as torch_matching

    def as_set(a):
        return np.stack([rows[np.lexsort(rows.T[::-1])] for rows in np.asarray(a)])

    rng = np.random.default_rng(3)
    for h, w, r in [(8, 8, 32), (7, 9, 20)]:
        metric, x = (rng.standard_normal((2, h * w, 16)).astype(np.float32) for _ in range(2))
        merge, unmerge = bipartite_soft_matching_random2d(torch.from_numpy(metric), w, h, 2, 2, r, no_rand=True)
        theirs = merge(torch.from_numpy(x)).numpy()
        theirs_back = unmerge(torch.from_numpy(np.tanh(theirs) * 3)).numpy()
        order, num_dst = destination_partition(h, w, 2, 2, None)
        pairs = {"torch": (torch_matching(torch.from_numpy(metric), order, num_dst, r), torch.from_numpy, np.asarray),
                 "mlx": (mlx_matching(mx.array(metric), order, num_dst, r), mx.array, np.asarray)}
        for name, (pair, native, back) in pairs.items():
            ours = back(pair.merge(native(x)))
            assert ours.shape == theirs.shape == (2, h * w - r, 16)
            assert report(f"ToMe merge / unmerge vs tomesd's bipartite_soft_matching_random2d (max abs) [{name}]",
                          max(max_abs_error(as_set(ours), as_set(theirs)),
                              max_abs_error(back(pair.unmerge(native(np.tanh(ours) * 3))), theirs_back))) < 1e-6


def test_both_backends_give_the_same_latents(sd1, pipelines):
    """DeepCache (MLX: the guidance halves cached apart on two CPU streams; torch: one batch) and ToMe with use_rand
    (numpy picks keyed by seed, evaluation and block: the same on both, and another seed gives others)."""
    got = {}
    for backend_name in BACKENDS:
        pipe = _pipe(pipelines, sd1, backend_name, scheduler="euler_ancestral")
        pipe.enable_deepcache(interval=3, branch=0)
        got["deepcache", backend_name] = pipe(image_height=64, image_width=64, seed=2, output_type="latent", **RUN)
        pipe.disable_deepcache()
        pipe.enable_token_merging(ratio=0.5, seed=5)
        got["tome", backend_name] = pipe(image_height=64, image_width=64, seed=2, output_type="latent", **RUN)
    for what in ("deepcache", "tome"):
        assert report("DeepCache / ToMe (use_rand), same seed: MLX vs torch (rel. latent)",
                      rel_error(got[what, "mlx"], got[what, "torch"])) < 1e-5
    pipe.enable_token_merging(ratio=0.5, seed=6)
    assert max_abs_error(pipe(image_height=64, image_width=64, seed=2, output_type="latent", **RUN),
                         got["tome", "torch"]) > 1e-3


def test_deepcache_counts_every_sampler_evaluation_and_keeps_one_cache_per_call(sd1, pipelines, monkeypatch,
                                                                               backend_name):
    """Heun evaluates twice per step: each evaluation counts (5 for 3 steps: full at 0 and 3); every module call
    of an evaluation (MLX's two guidance halves on CPU streams, torch's one batch) follows the same schedule."""
    pipe = _pipe(pipelines, sd1, backend_name, scheduler="heun")
    calls = []
    keywords = type(pipe.backend).unet_call_keywords

    def spy(self, shape, size):
        out = keywords(self, shape, size)
        calls.append((self._evaluation[0], out["deep_cache"].reuses))
        return out

    monkeypatch.setattr(type(pipe.backend), "unet_call_keywords", spy)
    pipe.enable_deepcache(interval=3)
    pipe(image_height=64, image_width=64, latent=NOISE, output_type="latent", **{**RUN, "num_inference_steps": 3})
    per_evaluation = {}
    for evaluation, reuses in calls:
        per_evaluation.setdefault(evaluation, set()).add(reuses)
    assert per_evaluation == {i: {i % 3 != 0} for i in range(5)}
    assert len({sum(1 for e, _ in calls if e == i) for i in range(5)}) == 1  # as many module calls in each


@pytest.mark.parametrize("video", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_deepcache_cached_call_on_the_same_input_is_the_full_call(sd1, unet3d_model, pipelines, backend_name, video):
    """At the shallowest, a middle and the deepest branch, a cached evaluation given the full one's input returns
    the full output (the shallow path recomputes exactly what it does not take from the cache) and a new input
    changes it; interval 1 is the plain call bit for bit. SD's UNet, and the UNet3D's video batches."""
    cls, root = (TextToVideoDiffusion, unet3d_model[1]) if video else (TextToImageDiffusion, sd1[1])
    b = pipelines.pipeline(cls, root, backend_name).backend
    rng = np.random.default_rng(5)
    shape = (2, 4, 3, 8, 8) if video else (2, 4, 8, 8)
    x, y = (b.latent_from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    ctx = b.from_numpy(rng.standard_normal((2, 77, 32)).astype(np.float32))
    plain_x, plain_y = (b.latent_to_numpy(b.unet(latent, 500.0, ctx)) for latent in (x, y))
    branches = len(b.unet_model.plan.skip_channels)
    for branch in (0, branches // 2, branches - 1):
        run = DeepCacheRun(DeepCacheConfig(interval=3, branch=branch), evaluations=3)
        outs = []
        for i, latent in enumerate((x, x, y)):
            with b.evaluation(i, run):
                outs.append(b.latent_to_numpy(b.unet(latent, 500.0, ctx)))
        assert run.cached_calls > 0 and np.array_equal(outs[0], plain_x)
        assert report(f"DeepCache: cached call on the full call's input, 3 branches (max abs) [{backend_name}]",
                      max_abs_error(outs[1], outs[0])) < 1e-5
        assert max_abs_error(outs[2], plain_y) > 1e-4


def test_settings_are_checked_before_any_work(sd1, pipelines):
    pipe = _pipe(pipelines, sd1, "mlx")
    for kwargs, words in [(dict(branch=9), "branch=9"), (dict(interval=0), "interval"),
                          (dict(schedule="quad"), "schedule")]:
        with pytest.raises(ValueError, match=words):
            pipe.enable_deepcache(**kwargs)
    for kwargs, words in [(dict(ratio=0.8), "ratio"), (dict(max_downsample=3), "max_downsample"),
                          (dict(sx=0), "sx")]:
        with pytest.raises(ValueError, match=words):
            pipe.enable_token_merging(**kwargs)
    pipe.enable_deepcache()
    with pytest.raises(ValueError, match="disable_deepcache"):
        pipe.enable_compile()
    assert pipe.settings.compile is False
    # DeepCache's non-uniform schedule: the repository's sample_from_quad_center for 50 steps, 1:3, center 15
    assert sorted(DeepCacheConfig(3, schedule="non_uniform").full_evaluations(50)) == [
        0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46]


@pytest.mark.slow
def test_sdxl_matches_the_packages(sdxl, pipelines, backend_name):
    """SDXL (text_time UNet, no attention at the highest resolution: ToMe needs max_downsample=2 there) against
    DeepCacheSDHelper and tomesd on StableDiffusionXLPipeline."""
    import copy

    import diffusers
    import tomesd
    from DeepCache import DeepCacheSDHelper

    ref = diffusers_pipeline(sdxl[0], scheduler=diffusers.DDIMScheduler.from_config(sdxl[0].scheduler.config))
    ref.unet = copy.deepcopy(ref.unet)
    noise = np.random.default_rng(2).standard_normal((1, 4, 8, 10)).astype(np.float32)
    args = dict(prompt="a lighthouse", negative_prompt="fog", num_inference_steps=4, guidance_scale=5.0)

    def theirs() -> np.ndarray:
        with torch.no_grad():
            return ref(height=64, width=80, latents=torch.from_numpy(noise), output_type="latent",
                       **args).images.numpy()

    pipe = pipelines.pipeline(TextToImageDiffusion, sdxl[1], backend_name, scheduler="ddim")

    def ours() -> np.ndarray:
        return pipe(image_height=64, image_width=80, latent=noise, output_type="latent", **args)

    exact = theirs()
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=2, cache_branch_id=1)  # its branch ids assume 3 skips a block; 0 and 1 hold
    helper.enable()
    want = theirs()
    helper.disable()
    pipe.enable_deepcache(interval=2, branch=1)
    assert max_abs_error(want, exact) > 1e-3
    assert report(f"SDXL DeepCache vs DeepCacheSDHelper (max abs latent) [{backend_name}]",
                  max_abs_error(ours(), want)) < 1e-4
    pipe.disable_deepcache()
    tomesd.apply_patch(ref, ratio=0.5, max_downsample=2, use_rand=False)
    want = theirs()
    tomesd.remove_patch(ref)
    pipe.enable_token_merging(ratio=0.5, max_downsample=2, use_rand=False)
    assert max_abs_error(want, exact) > 1e-3
    assert report(f"SDXL ToMe vs tomesd (max abs latent) [{backend_name}]", max_abs_error(ours(), want)) < 1e-4


@pytest.mark.slow
def test_animatediff_with_context_windows(sd1, motion_adapters, pipelines, backend_name):
    """A motion UNet over three context windows a step (each window cached on its own): interval 1 and ratio 0
    are the plain video bit for bit, and both speed-ups run together."""
    video = pipelines.pipeline(TextToVideoDiffusion, sd1[1], backend_name, motion_adapter=motion_adapters[True][1])
    video.enable_context_windows(length=16, stride=8)
    args = dict(prompt="a", video_frames=32, video_height=32, video_width=32, num_inference_steps=3, seed=2,
                output_type="latent")
    plain = video(**args)
    video.enable_deepcache(interval=1)
    video.enable_token_merging(ratio=0.0)
    assert np.array_equal(video(**args), plain)
    video.enable_deepcache(interval=2, branch=1)
    video.enable_token_merging(ratio=0.5)
    both = video(**args)
    assert both.shape == plain.shape and np.isfinite(both).all() and max_abs_error(both, plain) > 1e-4
