"""``latentsieve serve --workers N``: one gateway served by N processes on one port.

A single Python process answers on one core; a cached ``POST /score`` is pure interpreter time,
so past one core's worth of requests the latency is queueing. N worker processes (uvicorn's
supervisor, ``spawn`` start method) each run the whole app: its own registry, batcher, compute
thread and in-process cache. What must be one across them is made one here:

- **Connections, round robin.** The supervisor accepts every connection and hands it to the
  next worker over a Unix socket (``SCM_RIGHTS``), as Node's cluster module does. Workers that
  all accept from one shared socket split connections by luck: 8 keep-alive clients landed 7-1
  as often as 4-4, and the worker holding 7 answers at nearly twice the latency. A worker
  whose channel is full or gone is skipped, and a replacement takes turns once it has started.
- **Settings.** The parent's ``Settings`` (arguments and ``LATENTSIEVE_*``) are written back to
  ``LATENTSIEVE_*`` variables, from which each worker reads the same ``Settings()``.
- **Metrics.** ``PROMETHEUS_MULTIPROC_DIR`` puts every worker's counts in mmap files that any
  worker's ``/metrics`` merges (``service.metrics``). The folder is the caller's when that
  variable is set (its old ``*.db`` files are removed: counts start at 0, as on a restart),
  else a temporary one removed on exit.
- **Reload.** SIGHUP to the parent is forwarded to every started worker, which checks the
  store for new versions in place (uvicorn's own SIGHUP would restart the workers, dropping
  their caches); each worker also polls the store on its own.
- **Exits.** A worker that dies is replaced by the supervisor loop; its live queue-depth gauge
  is removed from the sum. A worker whose app fails to start stops the service (exit 3).

Not shared: the in-process score cache (each worker warms its own; configure Redis to share
one) and memory (each worker holds its own copy of every served index).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from index.errors import StoreError
from index.store import LatentStore
from service.metrics import MULTIPROC_ENV, log_density_buckets
from service.settings import Settings

log = logging.getLogger(__name__)

LOG_LEVEL_ENV = "LATENTSIEVE_LOG_LEVEL"
WORKER_FACTORY = "service.multiworker:worker_app"
ACCEPT_POLL_S = 0.25  # how soon the acceptor notices shutdown


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory): settings from the environment."""
    from latentsieve.logs import configure_logging
    from service.app import create_app

    # SIGHUP's default action is to exit: ignore it until the lifespan, once every index is
    # loaded, installs the reload handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(os.environ.get(LOG_LEVEL_ENV, "warning"))
    return create_app(Settings(), reload_on_sighup=True)  # type: ignore[call-arg]


class ChannelServer(uvicorn.Server):
    """A worker's uvicorn server that serves the connections handed over its channel (the one
    socket uvicorn passes it) instead of accepting from a listening socket."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        assert sockets is not None and len(sockets) == 1, "a worker takes one channel"
        self._channel = sockets[0]
        self._adopting: set[asyncio.Task[Any]] = set()
        await super().startup(sockets=[])  # the lifespan (loads every index); no listener
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> Any:
            # What uvicorn's own startup builds for each accepted connection.
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state,
                app_state=self.lifespan.state, _loop=_loop,
            )

        loop = asyncio.get_running_loop()
        self._channel.setblocking(False)
        loop.add_reader(self._channel.fileno(), self._take, loop, create_protocol)

    def _take(
        self, loop: asyncio.AbstractEventLoop, create_protocol: Callable[..., Any]
    ) -> None:
        """Serve every connection waiting in the channel."""
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._channel, 1, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            if not message and not fds:  # the supervisor is gone: finish and exit
                loop.remove_reader(self._channel.fileno())
                self.should_exit = True
                return
            for fd in fds:
                connection = socket.socket(fileno=fd)
                task = loop.create_task(loop.connect_accepted_socket(create_protocol, connection))
                self._adopting.add(task)
                task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a handed-over connection could not be served",
                        extra={"error": repr(task.exception())})

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._channel.fileno())
        await super().shutdown(sockets)


class ChannelWorker(Process):
    """A uvicorn worker process, given the child end of a connection channel as its socket."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.channel, self._child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel.setblocking(False)  # a worker that stopped reading is skipped, not waited
        self.ready = False  # set once its health check says the app has started
        super().__init__(config, [self._child_end])

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into the child (its target is a bound method): not the parent's end.
        state = self.__dict__.copy()
        state.pop("channel", None)
        state.pop("_child_end", None)
        return state

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = ChannelServer(config=self.config)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        # In the child: build the server before uvicorn's health-check thread can race the
        # main thread to the lazy ``server`` property (two servers: never reported ready).
        _ = self.server
        super().target(sockets)

    def start(self) -> None:
        super().start()
        self._child_end.close()  # the child holds its own copy now

    def close_channel(self, lock: threading.Lock) -> None:
        with lock:  # never while the acceptor sends on it (its number could be reused)
            self.channel.close()


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor with the listening socket kept here: an acceptor thread hands each
    connection to the next worker in turn; SIGHUP is forwarded (reload in place); dead workers
    are replaced and their live gauges dropped from the metrics."""

    def __init__(self, config: uvicorn.Config, listener: socket.socket, metrics_dir: str) -> None:
        super().__init__(config, sockets=[])
        self.listener = listener
        self.metrics_dir = metrics_dir
        self.processes: list[ChannelWorker] = []  # type: ignore[assignment]
        self.startup_failed = False
        self._stop_accepting = threading.Event()
        self._channels = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, name="acceptor", daemon=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop dealing at once, not at the next poll
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, sig: int, frame: object) -> None:
        self._stop_accepting.set()
        self.signal_queue.append(sig)

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            worker = ChannelWorker(self.config)
            worker.start()
            self.processes.append(worker)
        self._acceptor.start()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.should_exit.set()
            self._stop_accepting.set()
            if self._acceptor.is_alive():
                self._acceptor.join()
            for worker in self.processes:
                worker.close_channel(self._channels)

    def _accept(self) -> None:
        try:
            self.listener.listen(self.config.backlog)  # uvicorn's bind_socket only binds
            self.listener.settimeout(ACCEPT_POLL_S)
            turn = 0
            while not self._stopping():
                try:
                    connection, _ = self.listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:  # out of descriptors, say: wait rather than spin
                    if not self._stopping():
                        log.warning("accept failed", extra={"error": repr(exc)})
                        self._stop_accepting.wait(ACCEPT_POLL_S)
                    continue
                with connection:  # the parent's copy: the worker keeps its own
                    turn = self._deal(connection, turn)
        except Exception:
            log.exception("the acceptor failed; stopping")
            self.should_exit.set()
        finally:
            # New clients are refused from now on rather than reset after their handshake.
            self.listener.close()

    def _stopping(self) -> bool:
        return self._stop_accepting.is_set() or self.should_exit.is_set()

    def _deal(self, connection: socket.socket, turn: int) -> int:
        """Hand ``connection`` to the next started worker that can take it, waiting while every
        channel is full; returns the next turn."""
        while not self._stopping():
            workers = list(self.processes)
            # Started workers take turns; one still loading its indexes (a replacement) waits,
            # unless none has started yet (the connection then waits in a channel).
            serving = [worker for worker in workers if worker.ready] or workers
            for _ in range(len(serving)):
                worker = serving[turn % len(serving)]
                turn += 1
                with self._channels:
                    try:
                        socket.send_fds(worker.channel, [b"c"], [connection.fileno()])
                        return turn
                    except OSError:  # full (busy or hung), closed or dead: the next one
                        continue
            # Every channel is full: wait for room rather than drop a client.
            with contextlib.suppress(OSError, ValueError):
                select.select([], [worker.channel for worker in serving], [], ACCEPT_POLL_S)
        return turn

    def handle_hup(self) -> None:
        log.info("SIGHUP: every worker checks the store for new versions")
        for worker in self.processes:
            # One still loading reads the newest versions anyway.
            if worker.ready and worker.pid is not None and worker.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN ignored: the number of workers is fixed by --workers")

    def handle_ttou(self) -> None:
        log.warning("SIGTTOU ignored: the number of workers is fixed by --workers")

    def keep_subprocess_alive(self) -> None:
        """uvicorn's loop (replace hung or dead workers), with channel workers."""
        if self.should_exit.is_set():
            return
        for index, worker in enumerate(self.processes):
            if worker.is_alive(timeout=self.config.timeout_worker_healthcheck):
                if not worker.ready:
                    worker.ready = worker.is_ready(timeout=self.config.timeout_worker_healthcheck)
                continue
            worker.kill()
            worker.join()
            worker.close_channel(self._channels)
            if worker.pid is not None:
                mark_process_dead(worker.pid, self.metrics_dir)
            if worker.exitcode == STARTUP_FAILURE:
                log.error("a worker failed to start; stopping")
                self.startup_failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning("worker died; starting another", extra={"pid": worker.pid})
            replacement = ChannelWorker(self.config)
            replacement.start()
            self.processes[index] = replacement


@contextlib.contextmanager
def metrics_folder() -> Iterator[str]:
    """The multiprocess metrics folder: ``PROMETHEUS_MULTIPROC_DIR`` emptied of ``*.db`` files
    when set, else a temporary folder removed afterwards."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield str(folder)
        return
    created = tempfile.mkdtemp(prefix="latentsieve-metrics-")
    try:
        yield created
    finally:
        shutil.rmtree(created, ignore_errors=True)


def serve_workers(settings: Settings, log_level: str = "warning") -> None:
    """Serve ``settings`` with ``settings.workers`` processes until SIGINT/SIGTERM."""
    if settings.log_density_buckets is None:  # one set of buckets for every worker
        settings = settings.model_copy(
            update={"log_density_buckets": list(store_log_density_buckets(settings.store))}
        )
    with metrics_folder() as folder:
        for name in [key for key in os.environ if key.startswith("LATENTSIEVE_")]:
            del os.environ[name]  # the workers must read exactly these settings
        os.environ.update(settings.environment())
        os.environ[LOG_LEVEL_ENV] = log_level
        os.environ[MULTIPROC_ENV] = folder  # before the workers import prometheus_client
        config = uvicorn.Config(
            WORKER_FACTORY, factory=True, host=settings.host, port=settings.port,
            workers=settings.workers, log_level="warning", access_log=False,
            timeout_graceful_shutdown=10,
        )
        listener = config.bind_socket()
        log.info("gateway workers starting", extra={"workers": settings.workers,
                                                    "metrics_dir": folder})
        supervisor = WorkerSupervisor(config, listener, metrics_dir=folder)
        try:
            supervisor.run()
        finally:
            listener.close()
    if supervisor.startup_failed:
        raise SystemExit(STARTUP_FAILURE)


def store_log_density_buckets(store: Path) -> tuple[float, ...]:
    """The score buckets a single process would derive at start-up, from the manifests of each
    model's newest version (read without loading an index)."""
    latents = LatentStore(store)
    ranges = []
    for model in latents.models():
        version = latents.newest(model)
        if version is None:
            continue
        try:
            calibration = latents.read_manifest(model, version).calibration
        except StoreError:
            continue  # the workers will skip it too
        ranges.append((calibration.log_density_min, calibration.log_density_max))
    return log_density_buckets(ranges)
