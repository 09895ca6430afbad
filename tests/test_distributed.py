"""Generation across processes (mlx_stablefused.distributed, pipelines/data_parallel.py).

In-process (default run): the shard arithmetic and its noise against one process's draws, the start-up
check and the checked exchange on a simulated group (a mismatch, a lost peer, damaged bytes, a rank at
another exchange). Spawned (slow): 2 ranks on this machine under ``mlx.launch --backend ring`` and
``torchrun --standalone`` (gloo), every output compared with one process; a rank killed mid-run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import TESTS_DIR, report

from mlx_stablefused.distributed import Group, check_same_run, fingerprint
from mlx_stablefused.errors import DistributedError
from mlx_stablefused.pipelines.data_parallel import Shard
from mlx_stablefused.schedulers.brownian import StepNoise

ROOT = TESTS_DIR.parent
WORKER = TESTS_DIR / "distributed_worker.py"
SCENARIOS = ("interpolate", "interpolate_ancestral", "walk", "batch", "img2img", "inpaint", "sweep",
             "guidance_parallel", "windows", "videos")
LAUNCH_TIMEOUT_S = 240  # a whole launch; the ranks' own bound on a wait is far shorter (ENV_TIMEOUT below)


# ------------------------------------------------------------------------------------------ in-process
def test_shards_cover_every_item_once_and_draw_one_process_noise():
    """Windows of equal size on every rank, each item merged from its owner in order, and every rank's
    step noise (plain and Brownian) is its window of the one process's draws."""
    for total in range(1, 8):
        for size in (2, 3):
            shards = [Shard(total, r, size) for r in range(size)]
            assert {s.per_rank for s in shards} == {-(-total // size)}
            gathered = np.stack([np.arange(total)[s.window] for s in shards])
            assert np.array_equal(shards[0].merge(gathered), np.arange(total)), (total, size)
    shard = Shard(5, 1, 2)  # window = items 2..4 (3 per rank): the last rank recomputes item 2, owns 3..4
    whole = StepNoise((5, 4, 2, 2), np.random.default_rng(3))
    part = shard.step_noise((3, 4, 2, 2), np.random.default_rng(3))
    for _ in range(2):
        assert np.array_equal(part(), whole()[2:5])
    assert np.array_equal(part.brownian(0.1, 2.0)(0.5, 1.0), whole.brownian(0.1, 2.0)(0.5, 1.0)[2:5])


class ThreadRank(Group):
    """One of two ranks played by threads of this process, exchanging through shared slots; ``tamper``
    changes what rank 1 sends on the wire (a dead peer's stale bytes, damage)."""

    engine = "threads"

    def __init__(self, rank, shared):
        self.rank, self.size, self.shared, self.sequence = rank, 2, shared, 0

    def _all_gather(self, array):
        shared = self.shared
        shared["slots"][self.rank] = shared["tamper"](array) if self.rank == 1 else array
        shared["barrier"].wait(timeout=10)
        out = np.stack(shared["slots"])
        shared["barrier"].wait(timeout=10)
        return out


def on_two_ranks(work, tamper=lambda wire: wire):
    """``work(group)`` on two thread ranks; each rank's result or exception."""
    import threading

    shared = {"slots": [None, None], "barrier": threading.Barrier(2), "tamper": tamper}
    results = [None, None]

    def run(rank):
        try:
            results[rank] = work(ThreadRank(rank, shared))
        except Exception as e:  # noqa: BLE001  (the test inspects it)
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


class FakeBackend:
    name, dtype, configs, components = "mlx", "float32", {"unet": "cfg"}, {}


class OtherModel(FakeBackend):
    configs = {"unet": "another cfg"}


def test_start_check_and_exchanges_refuse_a_different_rank_or_a_lost_peer():
    """Every rank gets the error, naming the rank and what differs; nothing waits forever."""
    def start(backends, prompts):
        return lambda g: check_same_run(g, backends[g.rank], ("settings",), "call", {"prompt": prompts[g.rank],
                                                                                   "latent": np.ones(3)})

    assert on_two_ranks(start([FakeBackend(), FakeBackend()], ["a cat", "a cat"])) == [None, None]
    for ranks, what in (([FakeBackend(), OtherModel()], ["a cat"] * 2), "different model"), \
                       (([FakeBackend()] * 2, ["a cat", "a dog"]), "different arguments of call"):
        errors = on_two_ranks(start(*ranks))
        assert all(isinstance(e, DistributedError) and re.search(rf"rank\(s\) \[1\] run a {what}", str(e))
                   for e in errors), errors
    gathered = on_two_ranks(lambda g: g.all_gather(np.full(3, g.rank, np.float32), "x"))
    assert all(np.array_equal(out, [[0, 0, 0], [1, 1, 1]]) for out in gathered)

    def stale(wire):  # what MLX's ring backend can hand back after the peer died: old bytes
        return np.full_like(wire, 7)

    def damaged(wire):
        return wire if wire.dtype == np.int32 else _flip(wire, 0)

    def behind(wire):  # a rank at another exchange (another request, an early stop)
        return _with(wire, 1, wire[1] + 1) if wire.dtype == np.int32 else wire

    def other_shape(wire):
        return _with(wire, 4, 5) if wire.dtype == np.int32 else wire

    for tamper, message in ((stale, r"no valid answer from rank\(s\) \[1\]"), (damaged, "from rank 1 arrived damaged"),
                            (behind, r"rank\(s\) \[1\] are at another exchange"), (other_shape, "different shapes")):
        errors = on_two_ranks(lambda g: g.all_gather(np.zeros((2, 3), np.float32), "gathering the batch"), tamper)
        assert isinstance(errors[0], DistributedError) and re.search(message, str(errors[0])), errors
        assert "rank 0 of 2 (threads): gathering the batch" in str(errors[0])
    assert fingerprint({"a": np.zeros(2)}) != fingerprint({"a": np.ones(2)})


def _flip(array: np.ndarray, index: int) -> np.ndarray:
    out = array.copy()
    out.reshape(-1).view(np.uint8)[index] ^= 0xFF
    return out


def _with(array: np.ndarray, index: int, value: int) -> np.ndarray:
    out = array.copy()
    out[index] = value
    return out


# ---------------------------------------------------------------------------------------- spawned ranks
def rank_environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_RANK", "MLX_HOSTFILE", "PYTEST"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MLX_STABLEFUSED_CPU_STREAMS="1",
               MLX_STABLEFUSED_DISTRIBUTED_TIMEOUT="30")
    return env


def launch(kind: str, scenarios: str, out: Path, backend: str = "mlx") -> subprocess.CompletedProcess:
    command = {"mlx": ["mlx.launch", "-n", "2", "--backend", "ring", sys.executable],
               "torch": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]}[kind]
    return subprocess.run([*command, str(WORKER), scenarios, str(out), backend], env=rank_environment(out),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def one_process(scenario: str, backend: str, monkeypatch) -> np.ndarray:
    sys.path.insert(0, str(TESTS_DIR))
    import distributed_worker

    monkeypatch.setenv("MLX_STABLEFUSED_CPU_STREAMS", "1")
    return distributed_worker.run(scenario, distributed_worker.pipeline(scenario, backend, distributed=False))


@pytest.fixture(scope="module")
def demo_models():
    from mlx_stablefused.demo import ensure_demo_model, ensure_demo_motion_adapter

    ensure_demo_model(), ensure_demo_motion_adapter()  # built once here, not by two ranks at once


@pytest.mark.slow
@pytest.mark.parametrize("kind, backend", [("mlx", "mlx"), ("torch", "torch")])
def test_two_ranks_give_one_process_outputs(kind, backend, tmp_path, monkeypatch, demo_models):
    """Interpolation (a last batch of one frame for two ranks; an ancestral sampler), a prompt batch with
    num_images_per_prompt, a guidance sweep, guidance parallel, AnimateDiff context windows: every rank
    returns the whole result, equal to one process (bit-identical on MLX, whose ranks and the test run one
    thread each; torch here runs 2 threads against the ranks' one: float32 reduction order)."""
    for scenario in SCENARIOS:  # the one-process references first: they also fill the conversion cache
        np.save(tmp_path / f"{scenario}-ref.npy", one_process(scenario, backend, monkeypatch))
    done = launch(kind, ",".join(SCENARIOS), tmp_path, backend)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for scenario in SCENARIOS:
        ref = np.load(tmp_path / f"{scenario}-ref.npy")
        for rank in (0, 1):
            got = np.load(tmp_path / f"{scenario}-rank{rank}.npy")
            error = report(f"2 ranks vs one process, {scenario} (max abs) [{kind}]", np.abs(got - ref).max())
            assert got.shape == ref.shape, scenario
            assert error == 0.0 if backend == "mlx" else error <= 5e-4, (scenario, rank, error)


@pytest.mark.slow
def test_ranks_that_differ_are_refused_on_every_rank(tmp_path, demo_models):
    done = launch("mlx", "mismatch", tmp_path)
    assert done.stderr.count("rank(s) [1] run a different arguments of TextToImageDiffusion.__call__") == 2, \
        done.stderr[-3000:]
    assert not list(tmp_path.glob("mismatch-*"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlx", "torch"])
def test_a_rank_killed_mid_run_ends_the_launch_without_output(kind, tmp_path, demo_models):
    """Both launchers end the other rank when one dies (mlx.launch then exits 0: its own behaviour); no
    output file is written, and the launch ends long before any timeout."""
    start = time.perf_counter()
    done = launch(kind, "killed", tmp_path)
    assert time.perf_counter() - start < LAUNCH_TIMEOUT_S / 2
    assert "exited with code 9" in done.stdout + done.stderr or "exitcode: 9" in done.stdout + done.stderr
    assert not list(tmp_path.glob("killed*")), list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_dead_peer_gives_an_error_on_the_survivor(tmp_path, demo_models):
    """Without a launcher to end it: rank 0 of two ring processes, whose peer dies mid-run, raises
    DistributedError naming the lost rank, within the bound, and writes nothing."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(f'[["127.0.0.1:{ports[0]}"], ["127.0.0.1:{ports[1]}"]]')
    env = rank_environment(tmp_path)
    procs = [subprocess.Popen([sys.executable, str(WORKER), "killed", str(tmp_path)], env={**env, "MLX_RANK": str(r),
                              "MLX_HOSTFILE": str(hostfile)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]
    start = time.perf_counter()
    outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    assert time.perf_counter() - start < 60
    assert procs[0].returncode == 9
    assert procs[1].returncode != 0 and "DistributedError" in outputs[1][1], outputs[1][1][-2000:]
    assert "rank 0 of 2" in outputs[1][1] and "[1]" in outputs[1][1]
    assert not list(tmp_path.glob("killed*"))


@pytest.mark.slow
def test_cli_under_mlx_launch_writes_once_what_one_process_writes(tmp_path, demo_models):
    """``--`` ends mlx.launch's own flags (its --backend would take the CLI's)."""
    from PIL import Image

    flags = ["txt2img", "--model", "demo:tiny-random", "--prompt", "a cat", "--num-images", "3", "--steps", "2",
             "--height", "32", "--width", "32", "--seed", "3", "--no-progress", "--backend", "mlx"]
    env = rank_environment(tmp_path)
    one = subprocess.run([sys.executable, "-m", "mlx_stablefused.cli", *flags, "--output", str(tmp_path / "one.png")],
                         env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(["mlx.launch", "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "mlx_stablefused.cli",
                          *flags, "--output", str(tmp_path / "two.png")], env=env, capture_output=True, text=True,
                         timeout=LAUNCH_TIMEOUT_S)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 3, two.stdout
    ones, twos = sorted(tmp_path.glob("one*.png")), sorted(tmp_path.glob("two*.png"))
    assert len(ones) == len(twos) == 3
    for a, b in zip(ones, twos):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))

