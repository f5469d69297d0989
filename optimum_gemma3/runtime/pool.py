"""Tensor-parallel ranks on the `cpu` backend: one process per rank, started and stopped here.

Each rank process joins a gloo process group (the default group the compiled programs'
collectives run on), loads its `RankEngine` (programs, its weight shard, its caches) and
then serves commands from the parent: every command goes to all ranks, which run the
same program in lockstep; rank 0 writes the gathered logits into a shared-memory buffer.
The user's process never joins the process group, so its own torch.distributed state is
untouched.

Failure and shutdown: the parent waits on the ranks' replies and on their process
sentinels together, so a rank that dies (killed, out of memory) fails the call at once
with its exit code, and the other ranks are stopped. `close()`, garbage collection of the
pool and interpreter exit (a `weakref.finalize`) stop every rank; a rank whose parent
vanishes sees its command pipe close and exits.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import sys
import tempfile
import traceback
import types
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
# A collective still waiting for a peer after this long fails the call (instead of
# waiting forever): far longer than any one layer's work between two collectives.
COLLECTIVE_TIMEOUT_S = 600.0


class TensorParallelError(RuntimeError):
    """A rank process failed or died: the model cannot continue and must be reloaded."""


def _rank_main(
    rank: int, degree: int, folder: str, token, store: str, timeout_s: float, conn, logits
) -> None:
    """A rank process: join the group, load this rank's engine, serve commands until told."""
    from transformers import AutoConfig

    from ..artifact.checks import load_neuron_config
    from ..graphs import text_config
    from .rank import RankEngine

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // degree))
    try:
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store, degree),
            rank=rank,
            world_size=degree,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        folder = Path(folder)
        text = text_config(AutoConfig.from_pretrained(folder))
        engine = RankEngine(folder, load_neuron_config(folder), text, rank, token)
        conn.send(("ready", None))
    except Exception:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    with torch.inference_mode():
        while True:
            try:
                command, args = conn.recv()
            except EOFError:  # the parent is gone
                break
            if command == "stop":
                break
            try:
                out = getattr(engine, command)(*args)
                if rank == 0 and out is not None:
                    logits[: out.shape[0]].copy_(out)
                conn.send(("ok", None))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


def _stop(processes: list, conns: list[Connection], store_dir: str) -> None:
    """Ask every rank to stop, then terminate and finally kill any that does not."""
    for conn in conns:
        try:
            conn.send(("stop", None))
        except (OSError, ValueError):
            pass
    for process in processes:
        process.join(timeout=STOP_TIMEOUT_S)
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()
    shutil.rmtree(store_dir, ignore_errors=True)


class RankPool:
    """`tp_degree` rank processes running one compiled folder, driven like one `RankEngine`."""

    def __init__(
        self, folder: Path, neuron_config, vocab_size: int, token: str | bool | None = None
    ):
        degree = neuron_config.tp_degree
        context = mp.get_context("spawn")
        # Rank 0 writes each call's logits here; the parent reads them without a copy over
        # the pipe (a [batch, 262144] fp32 block per token).
        self._logits = torch.empty(
            neuron_config.batch_size, vocab_size, dtype=neuron_config.torch_dtype
        ).share_memory_()
        store_dir = tempfile.mkdtemp(prefix="optimum-gemma3-tp-")
        self._processes, self._conns = [], []
        for rank in range(degree):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_rank_main,
                args=(
                    rank,
                    degree,
                    str(folder),
                    token,
                    f"{store_dir}/store",
                    COLLECTIVE_TIMEOUT_S,
                    child_end,
                    self._logits,
                ),
                name=f"optimum-gemma3-tp-rank-{rank}",
                daemon=True,
            )
            with _without_main_module():
                process.start()
            child_end.close()
            self._processes.append(process)
            self._conns.append(parent_end)
        self._stop = weakref.finalize(self, _stop, self._processes, self._conns, store_dir)
        logger.info("started %d tensor-parallel rank processes", degree)
        self._collect("load")

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, *image_inputs
    ) -> torch.Tensor:
        return self._call("prefill", ids, mask, slot, *image_inputs)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._call("decode", ids, positions)

    def zero_caches(self) -> None:
        self._run("zero_caches")

    def close(self) -> None:
        self._stop()

    def _call(self, command: str, *args: torch.Tensor) -> torch.Tensor:
        """Run `command` on every rank; rank 0's output rows, one per row of `args[0]`."""
        self._run(command, *args)
        return self._logits[: args[0].shape[0]].clone()

    def _run(self, command: str, *args: torch.Tensor) -> None:
        if not self._stop.alive:
            raise TensorParallelError(
                "The tensor-parallel ranks of this model were stopped (closed, or a rank "
                "failed earlier): load the model again."
            )
        for conn in self._conns:
            try:
                conn.send((command, args))
            except OSError:  # a dead rank's pipe: its sentinel reports it below
                pass
        self._collect(command)

    def _collect(self, command: str) -> None:
        """Wait for every rank's reply; a death or an error stops all ranks and raises."""
        pending = dict(zip(self._conns, range(len(self._conns)), strict=True))
        sentinels = [p.sentinel for p in self._processes]
        while pending:
            for ready in wait([*pending, *sentinels]):
                if ready in sentinels:
                    self._fail_dead(command)
                try:
                    status, detail = ready.recv()
                except (EOFError, OSError):  # the rank is exiting
                    self._fail_dead(command)
                rank = pending.pop(ready)
                if status == "error":
                    # A collective fails on the survivors when a peer dies: name the death.
                    if wait(sentinels, timeout=2.0):
                        self._fail_dead(command)
                    self._stop()
                    raise TensorParallelError(
                        f"Tensor-parallel rank {rank} failed during {command}; the ranks were "
                        f"stopped.\n{detail}"
                    )

    def _fail_dead(self, command: str):
        """Raise naming every rank that died, a signal-killed one first (the likely cause)."""
        exited = wait([p.sentinel for p in self._processes], timeout=2.0)  # others fail too
        for process in self._processes:
            if process.sentinel in exited:
                # Its pipes close before it can be reaped: join so that exitcode is set.
                process.join(timeout=2.0)
        dead = [(p.exitcode, rank, p.pid) for rank, p in enumerate(self._processes)]
        dead = sorted((d for d in dead if d[0] is not None), key=lambda d: (d[0] >= 0, d[1]))
        self._stop()
        deaths = ", ".join(f"rank {r} (pid {pid}) exited with code {code}" for code, r, pid in dead)
        raise TensorParallelError(
            f"Tensor-parallel ranks died during {command}: {deaths}; the other ranks were "
            "stopped. Load the model again to continue."
        )


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Start spawned ranks without re-importing the user's `__main__` script.

    Spawned children import the parent's main module unless it has no file (as in an
    interactive session); a script without an `if __name__ == "__main__":` guard would
    then load the model again in every rank. Ranks need only this package.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
