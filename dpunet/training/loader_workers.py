"""Background worker processes that build PatientBatches ahead of the trainer.

The trainer knows its schedule in advance (the Poisson draw of each step's patients and its split into micro-
batches), so workers can build the next steps' micro-batches while the current one trains. Because every batch is
a pure function of (seed, step, patient ids), the output does not depend on the number of workers or on which
worker built what.

Robustness: each worker answers through its own pipe whose write end only the worker holds, so a worker that
dies (killed, out of memory) shows up as end-of-file or an exited process instead of a hang; a worker that raises
sends the traceback. Either becomes a DpunetError in the trainer's process. Workers exit when told to, when the
main process disappears, and are terminated by close() (also run by the context manager, garbage collection
and at interpreter exit).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Iterable, Iterator, Sequence

from dpunet.privacy.engines.base import PatientBatch
from dpunet.training.dataloading import PatientPatchSampler, iterate_micro_batches
from dpunet.utils.errors import DpunetError

# how often blocked waits wake up to check on the workers / the parent process
_POLL_S = 0.2

TaskKey = tuple[int, int]  # (step, micro-batch index)


def _worker_main(sampler: PatientPatchSampler, seed: int, tasks: Any, results: Connection, parent_pid: int) -> None:
    # Ctrl-C goes to the whole process group: the trainer handles it and shuts the workers down
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # orphaned: the trainer is gone
                return
            continue
        if task is None:
            return
        step, index, patient_ids = task
        try:
            arrays = sampler.make_patient_arrays(patient_ids, step, seed)
            message = ("ok", (step, index), arrays)
        except Exception as e:  # reported to the trainer, which raises it there
            message = ("error", (step, index), f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            results.send(message)
        except (BrokenPipeError, EOFError, OSError):
            return


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _shutdown(processes: list, connections: list, tasks: Any, stop: threading.Event, join_s: float) -> None:
    """Stop the workers (politely, then by force) and release pipes and queues; safe to call twice."""
    stop.set()
    if tasks is not None:
        for p in processes:
            try:
                tasks.put_nowait(None)
            except Exception:
                break
    deadline = time.monotonic() + join_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for c in connections:
        try:
            c.close()
        except OSError:
            pass
    if tasks is not None:
        tasks.cancel_join_thread()
        tasks.close()
    for p in processes:
        try:
            p.close()
        except ValueError:
            pass
    processes.clear()


class _Inbox:
    """What the reader thread shares with the loader: finished micro-batches and the first error.

    Kept apart from the loader so that the thread does not keep the loader alive (its finalizer must be able to
    run when the loader is dropped without close())."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.results: dict[TaskKey, Any] = {}
        self.error: DpunetError | None = None
        self.stop = threading.Event()

    def accept(self, message: tuple) -> None:
        status, key, payload = message
        with self.cond:
            if status == "ok":
                self.results[key] = payload
            elif self.error is None:
                self.error = DpunetError(f"data loader worker failed building step {key[0]} micro-batch {key[1]}: "
                                         f"{payload}")
            self.cond.notify_all()

    def worker_died(self, index: int, process: Any) -> None:
        if self.stop.is_set():
            return
        process.join(0.5)
        with self.cond:
            if self.error is None:
                self.error = DpunetError(f"data loader worker {index} (pid {process.pid}) "
                                         f"{_describe_exit(process.exitcode)}; training cannot continue without its "
                                         "batches (out of memory? lower num_workers or the patch count)")
            self.cond.notify_all()


def _read_results(inbox: _Inbox, connections: list[Connection], processes: list) -> None:
    """Reader thread: move finished micro-batches from the worker pipes into the inbox; notice dead workers."""
    index_of = {c: i for i, c in enumerate(connections)}
    process_of = dict(zip(connections, processes))
    open_conns = list(connections)
    while not inbox.stop.is_set() and open_conns:
        try:
            ready = wait(open_conns + [process_of[c].sentinel for c in open_conns], timeout=_POLL_S)
        except (OSError, ValueError):
            return  # handles closed by shutdown
        for obj in ready:
            if inbox.stop.is_set():
                return
            if isinstance(obj, Connection):
                conn = obj
                if conn not in open_conns:
                    continue
                try:
                    inbox.accept(conn.recv())  # a live worker's message is read whole
                    continue
                except (EOFError, OSError):
                    pass  # end of file: the worker is gone
            else:  # a process sentinel: the worker ended; take what it sent before, then report it
                conn = next((c for c in open_conns if process_of[c].sentinel == obj), None)
                if conn is None:
                    continue
                try:
                    while conn.poll():
                        inbox.accept(conn.recv())
                except (EOFError, OSError):
                    pass
            open_conns.remove(conn)
            inbox.worker_died(index_of[conn], process_of[conn])


class BackgroundPatientLoader:
    """Builds PatientBatches for (step, micro-batch) requests in worker processes.

    `submit(step, micro_batches)` queues the work of one step; `get(step)` returns its PatientBatches in order.
    `iterate(schedule)` does both, keeping `prefetch_steps` steps in flight. num_workers=0 builds inline.
    """

    def __init__(self, sampler: PatientPatchSampler, num_workers: int, seed: int, prefetch_steps: int = 2,
                 timeout_s: float = 600.0, start_method: str | None = None, join_timeout_s: float = 2.0) -> None:
        if num_workers < 0:
            raise DpunetError(f"num_workers must be >= 0, got {num_workers}")
        self.sampler = sampler
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.prefetch_steps = max(0, int(prefetch_steps))
        self.timeout_s = float(timeout_s)
        self._requests: dict[int, list[list[str]]] = {}
        self._inbox = _Inbox()
        self._closed = False
        self._processes: list = []
        self._connections: list[Connection] = []
        self._tasks = None
        self._reader: threading.Thread | None = None
        self.worker_pids: list[int] = []
        if self.num_workers == 0:
            self._finalizer = weakref.finalize(self, lambda: None)
            return
        ctx = mp.get_context(start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn"))
        self._tasks = ctx.Queue()
        # registered before any worker starts so that a half-started pool is still cleaned up
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._connections, self._tasks,
                                           self._inbox.stop, join_timeout_s)
        try:
            for i in range(self.num_workers):
                receive, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker_main, args=(sampler, self.seed, self._tasks, send, os.getpid()),
                                name=f"dpunet-loader-{i}", daemon=True)
                self._connections.append(receive)
                p.start()
                send.close()  # only the worker holds the write end: its death reads as EOF here
                self._processes.append(p)
        except BaseException:
            self.close()
            raise
        self.worker_pids = [p.pid for p in self._processes]
        self._reader = threading.Thread(target=_read_results, args=(self._inbox, self._connections,
                                                                    list(self._processes)),
                                        name="dpunet-loader-reader", daemon=True)
        self._reader.start()

    def submit(self, step: int, micro_batches: Sequence[Sequence[str]]) -> None:
        """Queue the micro-batches (lists of patient ids) of one step."""
        if self._closed:
            raise DpunetError("the data loader is closed")
        if step in self._requests:
            raise DpunetError(f"step {step} was already submitted to the data loader")
        self._requests[step] = [list(mb) for mb in micro_batches]
        if self._tasks is not None:
            for index, mb in enumerate(self._requests[step]):
                self._tasks.put((step, index, mb))

    def get(self, step: int) -> list[PatientBatch]:
        """The PatientBatches of a submitted step, in micro-batch order (blocks until they are built)."""
        if self._closed:
            raise DpunetError("the data loader is closed")
        if step not in self._requests:
            raise DpunetError(f"step {step} was never submitted to the data loader")
        micro_batches = self._requests.pop(step)
        if self._tasks is None:
            return [self.sampler.make_patient_batch(mb, step, self.seed) for mb in micro_batches]
        keys = [(step, i) for i in range(len(micro_batches))]
        inbox = self._inbox
        self._check_workers()
        deadline = time.monotonic() + self.timeout_s
        with inbox.cond:
            while inbox.error is None and not all(k in inbox.results for k in keys):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                inbox.cond.wait(min(remaining, _POLL_S))
        # a worker that died after its share was done still leaves later steps without their batches
        self._check_workers()
        with inbox.cond:
            error = inbox.error
            if error is None and not all(k in inbox.results for k in keys):
                error = DpunetError(f"data loader produced no batch for step {step} within {self.timeout_s:.0f} s")
            arrays = None if error is not None else [inbox.results.pop(k) for k in keys]
        if error is not None:
            # a broken pool is not shut down politely: a dead worker may hold the task queue's lock for good
            for p in self._processes:
                if p.is_alive():
                    p.terminate()
            self.close()
            raise error
        return [self.sampler.to_patient_batch(*a) for a in arrays]

    def iterate(self, schedule: Iterable[tuple[int, Sequence[Sequence[str]]]]
                ) -> Iterator[tuple[int, list[PatientBatch]]]:
        """Yield (step, batches) for a schedule of (step, micro-batches), building `prefetch_steps` ahead."""
        pending: deque[int] = deque()
        upcoming = iter(schedule)

        def top_up() -> None:
            while len(pending) <= self.prefetch_steps:
                nxt = next(upcoming, None)
                if nxt is None:
                    return
                self.submit(nxt[0], nxt[1])
                pending.append(nxt[0])

        top_up()
        while pending:
            step = pending.popleft()
            top_up()
            yield step, self.get(step)

    def _check_workers(self) -> None:
        """Record an error for any worker that is no longer running (the reader may not have seen it yet)."""
        for index, p in enumerate(self._processes):
            if not p.is_alive():
                self._inbox.worker_died(index, p)

    @property
    def alive_workers(self) -> int:
        return sum(p.is_alive() for p in self._processes)

    def close(self) -> None:
        """Stop and reap the workers; idempotent."""
        self._closed = True
        self._finalizer()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2 * _POLL_S + 1.0)

    def __enter__(self) -> "BackgroundPatientLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def measure_loader_throughput(sampler: PatientPatchSampler, patient_ids: Sequence[str], steps: int,
                              num_workers: int = 0, patients_per_micro_batch: int | None = None, seed: int = 0,
                              warmup_steps: int = 1) -> float:
    """Patients per second the loader delivers when every step draws `patient_ids` (for benchmarks)."""
    if warmup_steps < 0:
        raise DpunetError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if steps < 1 or not patient_ids:
        raise DpunetError("throughput needs at least one step and one patient")
    micro = iterate_micro_batches(patient_ids, patients_per_micro_batch or len(patient_ids))
    with BackgroundPatientLoader(sampler, num_workers, seed, prefetch_steps=max(1, num_workers)) as loader:
        start = time.perf_counter()
        for step, _ in loader.iterate((s, micro) for s in range(warmup_steps + steps)):
            if step == warmup_steps - 1:  # the clock starts once the warm-up steps are delivered
                start = time.perf_counter()
        elapsed = time.perf_counter() - start
    return steps * len(patient_ids) / max(elapsed, 1e-9)
