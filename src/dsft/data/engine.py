"""Engines that run the data stage's batch steps: local (in-process or a worker pool) and Ray Data."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from dsft.errors import DataError

# Below this many items a pool costs more than it saves: run in-process.
MIN_PARALLEL = 4000


def batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class LocalEngine:
    """Runs batch functions in this process, or on a fork pool of `workers` processes for large inputs."""

    name = "local"

    def __init__(self, workers: int = 2, min_parallel: int = MIN_PARALLEL):
        self.workers = workers
        self.min_parallel = min_parallel

    def map_batches(self, fn: Callable[[list[Any]], Any], items: Sequence[Any], batch_size: int = 1000) -> list[Any]:
        """fn(batch) for each batch of items, results in input order (one per batch)."""
        parts = batches(items, batch_size)
        if self.workers <= 1 or len(items) < self.min_parallel or len(parts) < 2:
            return [fn(b) for b in parts]
        # fork is fast, but unsafe once torch (OpenMP threads) is loaded in this process: then start fresh workers
        method = "fork" if "fork" in mp.get_all_start_methods() and "torch" not in sys.modules else "spawn"
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context(method)) as pool:
            return list(pool.map(fn, parts))


class RayEngine:
    """Runs the same batch functions as Ray Data `map_batches` tasks; results are reassembled in input order."""

    name = "ray"

    def __init__(self, workers: int = 2):
        import os

        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data's own per-dataset INFO lines
        try:
            import ray
        except ImportError as err:
            raise DataError("data.engine=ray needs Ray Data: pip install 'dsft[ray]' (or 'ray[data]')") from err
        import logging

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self.started = True
        for name in ("ray.data", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False

    def map_batches(self, fn: Callable[[list[Any]], Any], items: Sequence[Any], batch_size: int = 1000) -> list[Any]:
        import numpy as np

        parts = batches(items, batch_size)
        if not parts:
            return []
        ds = self.ray.data.from_items([{"i": k, "blob": pickle.dumps(b)} for k, b in enumerate(parts)])

        def apply(batch: dict[str, Any]) -> dict[str, Any]:
            out = [pickle.dumps(fn(pickle.loads(blob))) for blob in batch["blob"]]
            return {"i": np.asarray(batch["i"]), "blob": np.asarray(out, dtype=object)}

        rows = ds.map_batches(apply, batch_size=1).take_all()
        rows.sort(key=lambda r: int(r["i"]))
        return [pickle.loads(r["blob"]) for r in rows]


def get_engine(name: str, workers: int = 2) -> LocalEngine | RayEngine:
    if name == "ray":
        return RayEngine(workers)
    if name == "local":
        return LocalEngine(workers)
    raise DataError(f"data.engine: unknown engine '{name}' (local, ray)")
