"""backend="auto": the rule on every kind of machine, what wins over it, the one line that says which and why,
and that pipelines, ModelComponents.load and the CLI default to it."""

import inspect
import logging

import pytest

from mlx_stablefused import cli
from mlx_stablefused.backends.auto import ENVIRONMENT_VARIABLE, MachineFacts, choose_backend, resolve_backend

APPLE = MachineFacts(apple_silicon=True, mlx_installed=True, torch_installed=True, torch_mps=True, mlx_gpu=True)
CUDA = MachineFacts(apple_silicon=False, mlx_installed=True, torch_installed=True, cuda_device="NVIDIA H200")
MLX_CUDA_BUILD = MachineFacts(apple_silicon=False, mlx_installed=True, torch_installed=True, mlx_gpu=True)
CPU_BOTH = MachineFacts(apple_silicon=False, mlx_installed=True, torch_installed=True)
CPU_MLX_ONLY = MachineFacts(apple_silicon=False, mlx_installed=True, torch_installed=False)
MAC_TORCH_ONLY = MachineFacts(apple_silicon=True, mlx_installed=False, torch_installed=True, torch_mps=True)
RULE = [  # facts, device asked for, backend, a word the reason must hold
    (APPLE, None, "mlx", "Metal"),
    (CUDA, None, "torch", "CUDA"),
    (MLX_CUDA_BUILD, None, "mlx", "GPU build"),
    (CPU_BOTH, None, "torch", "faster"),
    (CPU_MLX_ONLY, None, "mlx", "not installed"),
    (MAC_TORCH_ONLY, None, "torch", "MPS"),
    (APPLE, "cpu", "torch", "no GPU"),  # asked for the CPU: the CPU rule
    (CPU_MLX_ONLY, "cpu", "mlx", "no GPU"),
    (CPU_BOTH, "gpu", "mlx", "only on the MLX"),  # devices that exist on one backend only
    (APPLE, "cuda:1", "torch", "only on the torch"),
    (APPLE, "mps", "torch", "only on the torch"),
]


def test_the_rule_on_every_kind_of_machine():
    for facts, device, name, word in RULE:
        choice = choose_backend(facts, device)
        assert (choice.name, word in choice.reason) == (name, True), (facts, device, choice)
    with pytest.raises(ImportError, match="neither MLX"):
        choose_backend(MachineFacts(apple_silicon=False, mlx_installed=False, torch_installed=False))


def test_explicit_wins_then_the_variable_then_the_rule_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "torch")
    with caplog.at_level(logging.INFO, logger="mlx_stablefused.backends.auto"):
        assert resolve_backend("mlx", facts=lambda: CUDA).name == "mlx"  # explicit: no detection, no line
        assert caplog.records == []
        assert resolve_backend("auto", facts=lambda: APPLE).name == "torch"  # the variable beats the rule
        monkeypatch.delenv(ENVIRONMENT_VARIABLE)
        choice = resolve_backend("auto", facts=lambda: CPU_BOTH)
    assert choice.name == "torch"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"backend: torch ({ENVIRONMENT_VARIABLE}=torch)", str(choice)], lines
    assert str(choice).startswith("backend: torch (no GPU") and "README" in str(choice)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "jax")
    with pytest.raises(ValueError, match=ENVIRONMENT_VARIABLE):
        resolve_backend("auto")


def test_auto_is_the_default_everywhere_and_loads_what_the_rule_picks(monkeypatch, sd1):
    from mlx_stablefused import TextToImageDiffusion, TextToVideoDiffusion
    from mlx_stablefused.pipelines.base import ModelComponents

    for fn in (TextToImageDiffusion.__init__, TextToVideoDiffusion.__init__, ModelComponents.load):
        assert inspect.signature(fn).parameters["backend"].default == "auto", fn
    assert cli.build_parser().parse_args(["txt2img", "--prompt", "x"]).backend == "auto"
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    expected = choose_backend(MachineFacts.detect()).name  # this machine's facts
    assert ModelComponents.load(sd1[1]).backend.name == expected


def test_cli_resolves_auto_before_work_and_prints_the_choice(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    monkeypatch.setattr(MachineFacts, "detect", classmethod(lambda cls: CPU_BOTH))
    args = cli.build_parser().parse_args(["txt2img", "--prompt", "x", "--model", "demo:tiny-random",
                                          "--output", str(tmp_path / "o.png")])
    cli.check_before_work(args)
    assert args.backend == "torch"
    built = {}

    class Recorder:
        def __init__(self, **kwargs):
            built.update(kwargs)

        def __getattr__(self, name):
            return lambda *a, **k: None

    cli.load_pipeline(Recorder, args)
    assert built["backend"] == "torch"
    assert capsys.readouterr().out.splitlines() == [str(choose_backend(CPU_BOTH))]
    explicit = cli.build_parser().parse_args(["txt2img", "--prompt", "x", "--backend", "mlx",
                                              "--output", str(tmp_path / "o.png")])
    cli.check_before_work(explicit)
    assert explicit.backend == "mlx" and getattr(explicit, "backend_choice", None) is None
