"""The command line's ControlNet flags, named as diffusers names the keywords: ``--controlnet`` (repeat for
several), ``--control-image`` (one per ControlNet, in the same order; for ``video`` the frames, one per frame),
``--controlnet-scale`` (``controlnet_conditioning_scale``), ``--control-guidance-start`` / ``--control-guidance-end``,
``--guess-mode``, and ``--canny LOW HIGH`` to turn the control images into canny edge maps first."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_values import check_input_image, finite, fraction, non_negative


def add_controlnet_flags(p: argparse.ArgumentParser, video: bool = False) -> None:
    group = p.add_argument_group("ControlNet")
    group.add_argument("--controlnet", action="append", default=None, metavar="CONTROLNET",
                       help="a ControlNet: diffusers folder, hub id (lllyasviel/control_v11p_sd15_canny) or original "
                            ".pth / .safetensors file; repeat for several (default: none)")
    group.add_argument("--control-image", action="append", nargs="+", default=None, metavar="PATH",
                       help=("the control frames, one image per frame" if video else "the control image, of the "
                             "output's size") + "; repeat once per --controlnet, in the same order (default: none)")
    group.add_argument("--controlnet-scale", type=finite("--controlnet-scale"), nargs="+", default=None,
                       metavar="SCALE", help="residual scale: one, or one per --controlnet (default: diffusers' "
                                             "pipeline default, 1.0; img2img 0.8; inpaint 0.5)")
    group.add_argument("--control-guidance-start", type=fraction("--control-guidance-start"), nargs="+",
                       default=None, metavar="FRACTION", help="where each ControlNet starts acting, in [0, 1] (default: 0)")
    group.add_argument("--control-guidance-end", type=fraction("--control-guidance-end"), nargs="+",
                       default=None, metavar="FRACTION", help="where each ControlNet stops acting, in [0, 1] (default: 1)")
    group.add_argument("--guess-mode", action="store_true",
                       help="the ControlNet sees only the conditional branch (works without a prompt)")
    group.add_argument("--canny", type=non_negative("--canny"), nargs=2, default=None, metavar=("LOW", "HIGH"),
                       help="use the canny edges of the control images (OpenCV; the controlnet extra) (default: off)")


def check_controlnet_flags(args: argparse.Namespace) -> None:
    """Counts and files, refused by flag before any model loads."""
    nets, images = getattr(args, "controlnet", None) or [], getattr(args, "control_image", None) or []
    if not hasattr(args, "controlnet"):
        return
    if nets and not images:
        raise ValueError("--control-image: each --controlnet needs its control image")
    if images and len(images) != len(nets):
        raise ValueError(f"--control-image: given {len(images)} times for {len(nets)} --controlnet; give one per "
                         "ControlNet, in the same order")
    for flag in ("controlnet_scale", "control_guidance_start", "control_guidance_end"):
        values = getattr(args, flag)
        if values is not None and len(values) not in (1, len(nets)):
            raise ValueError(f"--{flag.replace('_', '-')}: {len(values)} values for {len(nets)} --controlnet; give "
                             "one, or one per ControlNet")
    if (args.guess_mode or args.canny or any(getattr(args, f) is not None for f in (
            "controlnet_scale", "control_guidance_start", "control_guidance_end"))) and not nets:
        raise ValueError("the ControlNet flags need --controlnet")
    for paths in images:
        for path in paths:
            check_input_image(path, "--control-image")


def _one_or_list(values: list) -> Any:
    return values[0] if len(values) == 1 else list(values)


def controlnet_source(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline constructor's ``controlnet=`` (absent without --controlnet)."""
    nets = getattr(args, "controlnet", None)
    return {"controlnet": _one_or_list(nets)} if nets else {}


def controlnet_keywords(args: argparse.Namespace, video: bool = False) -> dict[str, Any]:
    """The call's ControlNet keywords the user gave (absent ones are left to the pipeline's defaults)."""
    images = getattr(args, "control_image", None)
    if not images:
        return {}
    per_net = []
    for paths in images:
        if args.canny:
            from .control_maps import canny_image

            paths = [canny_image(p, *args.canny) for p in paths]
        per_net.append(list(paths) if video else _one_or_list(paths))
    out: dict[str, Any] = {"control_image": _one_or_list(per_net) if not video or len(per_net) > 1 else per_net[0]}
    for flag, keyword in (("controlnet_scale", "controlnet_conditioning_scale"),
                          ("control_guidance_start", "control_guidance_start"),
                          ("control_guidance_end", "control_guidance_end")):
        values = getattr(args, flag)
        if values is not None:
            out[keyword] = _one_or_list(values)
    if args.guess_mode:
        out["guess_mode"] = True
    return out
