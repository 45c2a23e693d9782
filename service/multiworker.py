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
- **Reload.** SIGHUP to the parent is forwarded to every worker, which checks the store for new
  versions in place (uvicorn's own SIGHUP would restart the workers, dropping their caches);
  each worker also polls the store on its own.
- **Exits.** A worker that dies is replaced by uvicorn's supervisor loop; its live
  queue-depth gauge is removed from the sum.

Not shared: the in-process score cache (each worker warms its own; configure Redis to share
one) and memory (each worker holds its own copy of every served index).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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

from service.metrics import MULTIPROC_ENV
from service.settings import Settings

log = logging.getLogger(__name__)

LOG_LEVEL_ENV = "LATENTSIEVE_LOG_LEVEL"
WORKER_FACTORY = "service.multiworker:worker_app"
ACCEPT_POLL_S = 0.25  # how soon the acceptor notices shutdown


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory): settings from the environment."""
    from latentsieve.logs import configure_logging
    from service.app import create_app

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "warning"))
    return create_app(Settings(), reload_on_sighup=True)  # type: ignore[call-arg]


class ChannelServer(uvicorn.Server):
    """A worker's uvicorn server that serves the connections handed over its channel (the one
    socket uvicorn passes it) instead of accepting from a listening socket."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        assert sockets is not None and len(sockets) == 1, "a worker takes one channel"
        self._channel = sockets[0]
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
                loop.create_task(loop.connect_accepted_socket(create_protocol, connection))

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

    def start(self) -> None:
        super().start()
        self._child_end.close()  # the child holds its own copy now

    def close_channel(self) -> None:
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
        self._acceptor = threading.Thread(target=self._accept, name="acceptor", daemon=True)

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
            if self._acceptor.is_alive():
                self._acceptor.join()
            for worker in self.processes:
                worker.close_channel()

    def _accept(self) -> None:
        self.listener.listen(self.config.backlog)  # uvicorn's bind_socket only binds
        self.listener.settimeout(ACCEPT_POLL_S)
        turn = 0
        while not self.should_exit.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # out of descriptors, say: wait rather than spin
                if not self.should_exit.is_set():
                    log.warning("accept failed", extra={"error": repr(exc)})
                    self.should_exit.wait(ACCEPT_POLL_S)
                continue
            with connection:  # the parent's copy: the worker keeps its own
                workers = list(self.processes)
                # Started workers take turns; one still loading its indexes (a replacement)
                # waits, unless none has started yet (the connection then waits in a channel).
                serving = [worker for worker in workers if worker.ready] or workers
                for _ in range(len(serving)):
                    worker = serving[turn % len(serving)]
                    turn += 1
                    try:
                        socket.send_fds(worker.channel, [b"c"], [connection.fileno()])
                        break
                    except OSError:  # full (busy or hung) or closed: the next one
                        continue
                else:
                    log.warning("no worker could take a connection; it is closed")

    def handle_hup(self) -> None:
        log.info("SIGHUP: every worker checks the store for new versions")
        for worker in self.processes:
            if worker.pid is not None and worker.exitcode is None:
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
            worker.close_channel()
            if worker.pid is not None:
                mark_process_dead(worker.pid, self.metrics_dir)
            if worker.exitcode == STARTUP_FAILURE:
                log.error("a worker failed to start; stopping")
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
        try:
            WorkerSupervisor(config, listener, metrics_dir=folder).run()
        finally:
            listener.close()
