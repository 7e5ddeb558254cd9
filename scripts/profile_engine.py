"""Where the engine's own thread spends a pass of the wide workload (issue 5): cProfile of Engine._serve while the
packed policy serves bench.batching's wide queries (one LoRA r8 task, bert-base fp16 on the GPU), after warm-up
passes. A development probe: `python -m scripts.profile_engine [--policy packed] [--queries 4096]`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections.abc import Iterator
from contextlib import contextmanager

from bench.batching import serve
from pets_compiler.serving import engine
from scripts.profile_packed import warmed_wide


@contextmanager
def engine_thread_profiled(profiler: cProfile.Profile) -> Iterator[None]:
    """Inside, every Engine's serving loop (its own thread) runs under `profiler`."""
    loop = engine.Engine._serve

    def profiled(self: engine.Engine) -> None:
        profiler.enable()
        try:
            loop(self)
        finally:
            profiler.disable()

    engine.Engine._serve = profiled  # type: ignore[method-assign]
    try:
        yield
    finally:
        engine.Engine._serve = loop  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--policy", default="packed")
    p.add_argument("--queries", type=int, default=4096)
    args = p.parse_args()
    cfg, _, runtime, qs = warmed_wide(args.queries, args.policy)
    profiler = cProfile.Profile()
    with engine_thread_profiled(profiler):
        result = serve(runtime, qs, args.policy, cfg)
    keys = ("queries_per_s", "seconds", "submit_s", "batches", "batch_time_p50_ms", "launch_time_p50_ms")
    print({k: result[k] for k in keys})
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
