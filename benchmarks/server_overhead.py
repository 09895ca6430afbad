"""The server's overhead: one txt2img job through HTTP (a real uvicorn server, a keep-alive client) against
the same job on the same pipeline called directly (on the server's worker thread), alternating.

    python benchmarks/server_overhead.py                              # demo model, 128x128, 20 steps, mlx
    python benchmarks/server_overhead.py --backend torch --size 64 --rounds 20

Prints the median seconds of each and the overhead in percent. Timings never enter the tests.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import httpx
import uvicorn

from mlx_stablefused.demo import DEMO_MODEL_ID
from mlx_stablefused.server import ServerSettings, create_app
from mlx_stablefused.server.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL_ID)
    parser.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    settings = ServerSettings(model=args.model, backend=args.backend)
    engine = Engine(settings)
    engine.call(lambda e: e.load(args.model))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/sdapi/v1/txt2img"
    body = {"prompt": "a lighthouse", "seed": 1, "width": args.size, "height": args.size, "steps": args.steps,
            "sampler_name": "Euler"}

    def direct(e: Engine) -> None:
        pipe = e.pipes["txt2img"]
        pipe.set_scheduler("euler")
        pipe(prompt="a lighthouse", seed=1, image_height=args.size, image_width=args.size,
             num_inference_steps=args.steps, guidance_scale=7.0)

    client = httpx.Client(timeout=600)

    def via_http() -> None:
        response = client.post(url, json=body)
        response.raise_for_status()

    engine.call(direct), via_http()  # warm-up
    seconds: dict[str, list[float]] = {"direct": [], "http": []}
    for _ in range(args.rounds):
        for name, run in (("direct", lambda: engine.call(direct)), ("http", via_http)):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    d, h = statistics.median(seconds["direct"]), statistics.median(seconds["http"])
    print(f"{args.model} {args.backend} {args.size}x{args.size} {args.steps} steps: direct {d:.3f} s, "
          f"HTTP {h:.3f} s, overhead {100 * (h / d - 1):+.1f}% ({1e3 * (h - d):.1f} ms)")
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


if __name__ == "__main__":
    main()
