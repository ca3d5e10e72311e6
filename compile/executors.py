"""Where graph builds run: on this machine's compiler workers (the default), or spread over a Ray cluster.

A build farm converting a 72B model for a multi-chip board has ~160 block graphs per quantization, each
minutes of compiler time. `RayExecutor` ships each GraphJob to a Ray actor that owns a compiler worker on
its host: the actor first looks in its own content-addressed cache (the job's key is made of input hashes,
flags and compiler version), and only on a miss are the inputs shipped, each file once per run by its
sha256. The bmodel bytes come back and land in the local cache, so the combined bmodel is the same bytes
as a local build's. Needs `pip install llm-surgery[ray]` and the sophgo toolchain on every worker host.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from surgery.compile.sophgo_graphs import GraphJob, build
from surgery.compile.tpumlir import TpuMlirWorker, WorkerPool
from surgery.errors import SurgeryError


class LocalExecutor:
    """Builds on this machine's worker pool."""

    def __init__(self, pool: WorkerPool, cost: Callable[[GraphJob], float] | None = None,
                 exclusive: Callable[[GraphJob], bool] | None = None) -> None:
        self.pool = pool
        self.cost = cost  # the dearest builds start first
        self.exclusive = exclusive  # builds never run two at a time (memory)

    def build(self, jobs: list[GraphJob], source: Path, work: Path, cache: Path) -> list[Path]:
        return self.pool.map(lambda worker, job: build(worker, job, source, work, cache), jobs, cost=self.cost,
                             exclusive=self.exclusive)


class GraphBuilder:
    """A Ray actor body: one compiler worker on one host, with that host's cache and input store."""

    def __init__(self, cache: str | None = None) -> None:
        from surgery.compile.sophgo import cache_dir

        self.cache = Path(cache) if cache else cache_dir()
        self.root = Path(tempfile.mkdtemp(prefix="surgery-ray-"))
        self.store = self.root / "inputs"  # files by sha256, shared by every job on this host
        self.store.mkdir()
        self.worker: TpuMlirWorker | None = None

    def cached(self, job: GraphJob) -> bytes | None:
        path = self.cache / f"{job.key}.bmodel"
        return path.read_bytes() if path.is_file() else None

    def build(self, job: GraphJob, files: dict[str, bytes]) -> bytes:
        """`files`: sha256 -> content for the inputs this host lacks (from the driver's object store)."""
        for digest, content in files.items():
            if not (self.store / digest).is_file():
                if not isinstance(content, bytes):  # an object ref nested in the argument: Ray leaves those
                    import ray

                    content = ray.get(content)
                (self.store / digest).write_bytes(content)
        source = Path(tempfile.mkdtemp(dir=self.root))  # the job's inputs under their own names
        for name, digest in job.inputs.items():
            (source / name).symlink_to(self.store / digest)
        self.worker = self.worker or TpuMlirWorker()
        try:
            return build(self.worker, job, source, self.root / "work", self.cache).read_bytes()
        finally:
            shutil.rmtree(source, ignore_errors=True)

    def close(self) -> None:
        """Stop the compiler worker and drop this host's scratch (inputs, work); its cache stays."""
        if self.worker:
            self.worker.close()
        shutil.rmtree(self.root, ignore_errors=True)


class RayExecutor:
    """Builds on Ray actors (`address` as for `ray.init`: "auto", "ray://host:10001", or None for a local
    cluster started in this process)."""

    def __init__(self, address: str | None, workers: int, cache: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise SurgeryError("--executor ray needs Ray: pip install 'llm-surgery[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        actor = ray.remote(num_cpus=1)(GraphBuilder)
        self.actors = [actor.remote(cache) for _ in range(max(1, workers))]

    def build(self, jobs: list[GraphJob], source: Path, work: Path, cache: Path) -> list[Path]:
        ray = self.ray
        refs: dict[str, object] = {}  # sha256 -> object ref: each file goes into the object store once

        def ref(name: str, digest: str) -> object:
            if digest not in refs:
                refs[digest] = ray.put((source / name).read_bytes())
            return refs[digest]

        def store(path: Path, content: bytes) -> None:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(content)
            tmp.replace(path)

        cache.mkdir(parents=True, exist_ok=True)
        paths = [cache / f"{job.key}.bmodel" for job in jobs]
        pending = {}  # nets to build: the driver's cache and then a host's cache had none
        for i, (job, path) in enumerate(zip(jobs, paths, strict=True)):
            if path.is_file():
                continue
            actor = self.actors[i % len(self.actors)]
            hit = ray.get(actor.cached.remote(job))
            if hit is not None:
                store(path, hit)
            else:
                files = {digest: ref(name, digest) for name, digest in job.inputs.items()}
                pending[job.key] = actor.build.remote(job, files)
        for job, path in zip(jobs, paths, strict=True):
            if job.key in pending and not path.is_file():
                try:
                    store(path, ray.get(pending[job.key]))
                except ray.exceptions.RayTaskError as exc:
                    raise SurgeryError(f"graph {job.name} failed on the Ray cluster: "
                                       f"{str(exc.cause).splitlines()[0] if exc.cause else exc}") from None
        return paths

    def close(self) -> None:
        """Let every actor clean its host's scratch, then end the actors."""
        self.ray.get([actor.close.remote() for actor in self.actors])
        for actor in self.actors:
            self.ray.kill(actor)
