"""Client side of the long-lived TPU-MLIR workers (compile/tpumlir_worker.py): one process per job slot.

Each worker imports the compiler once (7-8 s of the ~10 s a `model_transform` call costs) and then
transforms, deploys and simulates graph after graph. Requests are JSON lines; a failed request answers
with the error and the job's log keeps the compiler's output, so the caller can say what failed and where.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from surgery.compile.toolchains import bin_env, python_of
from surgery.errors import SurgeryError

WORKER = Path(__file__).with_name("tpumlir_worker.py")
T = TypeVar("T")
R = TypeVar("R")


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class TpuMlirWorker:
    """One worker process; `call` runs one op and raises a SurgeryError naming it when it fails."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(python_of("sophgo")), str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=bin_env("sophgo"))
        ready = self.proc.stdout.readline()
        if not ready:
            raise SurgeryError("the TPU-MLIR worker did not start; check `surgery toolchain doctor`")

    def call(self, op: str, what: str, log: Path, **request: object) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        payload = {"op": op, "log": str(log), **{k: str(v) if isinstance(v, Path) else v for k, v in request.items()}}
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        answer = json.loads(line) if line else {"ok": False, "error": "the worker process died"}
        if not answer["ok"]:
            raise SurgeryError(f"{what} failed ({answer['error']})\nlast 30 lines of {log}:\n{log_tail(log)}")

    def stop(self) -> None:
        """Ask the worker to exit (it does once its input closes) without waiting for it."""
        if self.proc.poll() is None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def close(self) -> None:
        self.stop()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_WARM: queue.Queue[TpuMlirWorker] = queue.Queue()


def prewarm(count: int) -> None:
    """Start `count` workers in the background now (each spends ~8 s importing the compiler), so a compile
    that comes later (after export and optimize, in `convert`) finds them ready."""
    def start() -> None:
        try:
            _WARM.put(TpuMlirWorker())
        except SurgeryError:
            pass  # the compile will start its own and report the problem there

    for _ in range(count):
        threading.Thread(target=start, daemon=True).start()


def warm_or_new() -> TpuMlirWorker:
    """A worker `prewarm` started, if one is ready, else a new one."""
    try:
        return _WARM.get_nowait()
    except queue.Empty:
        return TpuMlirWorker()


class WorkerPool:
    """`jobs` workers started on first use; `map` runs a function over items, each call with a free worker."""

    def __init__(self, jobs: int, start: Callable[[], TpuMlirWorker] = warm_or_new) -> None:
        self.jobs = max(1, jobs)
        self.start = start  # how a worker starts (tests pass a stand-in)
        self.free: queue.Queue[TpuMlirWorker] = queue.Queue()
        self.started: list[TpuMlirWorker] = []
        self.lock = threading.Lock()  # `map` may run in several threads at once (compile/sophgo_ahead.py)

    def _take(self) -> TpuMlirWorker:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            with self.lock:
                start = len(self.started) < self.jobs
                if start:
                    self.started.append(None)  # a slot, filled below
            if start:
                try:
                    worker = self.start()
                except BaseException:
                    with self.lock:
                        self.started.remove(None)
                    raise
                with self.lock:
                    self.started[self.started.index(None)] = worker
                return worker
            return self.free.get()

    def map(self, fn: Callable[[TpuMlirWorker, T], R], items: Iterable[T],
            cost: Callable[[T], float] | None = None, exclusive: Callable[[T], bool] | None = None) -> list[R]:
        """`fn` over `items` on the workers, results in the items' order. With `cost`, the dearest items start
        first: a long job started last would leave the other workers idle while it runs alone. Items
        `exclusive` says yes to (at 7B a vocabulary-table build or check holds GBs) run alone: one waits for
        the items in flight to finish, nothing starts beside it, and the idle workers exit meanwhile (a worker
        holds 0.6 GB doing nothing; a new one starts in seconds when work comes back)."""
        items = list(items)
        pending = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else list(range(len(items)))
        alone = [bool(exclusive and exclusive(item)) for item in items]
        results: dict[int, R] = {}
        errors: list[BaseException] = []
        state = threading.Condition()
        running: list[int] = []  # items in flight

        def pick() -> int | None:
            """In order (dearest first): an exclusive item waits for the others to finish, and holds back
            everything after it until it is done."""
            if not pending or any(alone[i] for i in running):
                return None
            return None if alone[pending[0]] and running else pending[0]

        def next_item() -> int | None:
            with state:
                while pending and not errors:
                    if (i := pick()) is not None:
                        pending.remove(i)
                        running.append(i)
                        return i
                    state.wait()
                return None

        def loop() -> None:
            while (i := next_item()) is not None:
                worker = self._take()  # a worker per item, handed back before the item counts as done,
                if alone[i]:  # so all the others are idle here, and exit
                    self._retire_idle()
                try:
                    results[i] = fn(worker, items[i])
                except BaseException as exc:  # re-raised below, in the caller's thread
                    errors.append(exc)
                finally:
                    self.free.put(worker)
                    with state:
                        running.remove(i)
                        state.notify_all()

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(min(self.jobs, len(items)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return [results[i] for i in range(len(items))]

    def _retire_idle(self) -> None:
        """Stop the workers no thread holds (left by an earlier `map`)."""
        while True:
            try:
                self._retire(self.free.get_nowait())
            except queue.Empty:
                return

    def _retire(self, worker: TpuMlirWorker) -> None:
        """Stop an idle worker; `_take` starts a new one when needed."""
        with self.lock:
            self.started.remove(worker)
        worker.close()

    def close(self) -> None:
        workers = [w for w in self.started if w is not None]
        for worker in workers:  # all asked first: they tear the compiler down side by side
            worker.stop()
        for worker in workers:
            worker.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
