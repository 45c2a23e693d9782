"""Graceful drain: a stopping gateway finishes what is in flight and answers in the contract's
shape, instead of dropping connections or letting the server cancel requests into a plain 500.

On SIGTERM or SIGINT (uvicorn's own restart of a worker on SIGHUP sends SIGTERM too) a process
that owns its signals:

1. **lingers** ``drain_linger_s``: it keeps serving, ``/readyz`` answers 503 so that a load
   balancer stops sending, and every response carries ``Connection: close``, so a keep-alive
   client opens its next request elsewhere rather than on a connection about to be closed;
2. **drains**: it waits until no request is in flight, for ``drain_timeout_s`` at most; a
   request still running then is cancelled and answered ``503`` with a JSON ``detail`` and
   ``Retry-After`` (its work is lost, not its answer);
3. hands the signal to uvicorn, whose own shutdown then finds nothing left to cancel.

A second signal during the drain goes to uvicorn at once (uvicorn: a second Ctrl-C forces).
The hook chains to the handler uvicorn installed with ``signal.signal`` and restores it at the
lifespan's end; nothing of uvicorn's own is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SHUTTING_DOWN = "the gateway is shutting down; retry the request (another instance answers it)"
Handler = Callable[[int, FrameType | None], Any]


class Drain:
    """The drain's state, shared by the middleware (every request) and the signal hook."""

    def __init__(self, linger_s: float, timeout_s: float) -> None:
        self.linger_s = linger_s
        self.timeout_s = timeout_s
        self.draining = False
        self.inflight: set[asyncio.Task[Any]] = set()
        self._cancelled: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def enter(self, task: asyncio.Task[Any]) -> None:
        self.inflight.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[Any]) -> None:
        self.inflight.discard(task)
        self._cancelled.discard(task)
        if not self.inflight:
            self._idle.set()

    def was_cut(self, task: asyncio.Task[Any]) -> bool:
        """Whether the drain (not a client or the server) cancelled ``task``."""
        return task in self._cancelled

    async def run(self, then: Callable[[], None]) -> None:
        """Linger, wait for the requests in flight (cancel those past the timeout), ``then``."""
        started = time.monotonic()
        self.draining = True
        log.info("draining", extra={"inflight": len(self.inflight), "linger_s": self.linger_s,
                                    "timeout_s": self.timeout_s})
        try:
            await asyncio.sleep(self.linger_s)
            left = max(self.timeout_s - (time.monotonic() - started), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), left)
            if self.inflight:
                log.warning("drain timeout: answering the requests still running with 503",
                            extra={"inflight": len(self.inflight)})
                for task in list(self.inflight):
                    self._cancelled.add(task)
                    task.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), 5.0)
        finally:
            then()

    def begin(self, then: Callable[[], None]) -> None:
        """Start the drain once; ``then`` runs when it ends (the server's own shutdown)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(then), name="drain")

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Route SIGTERM and SIGINT through the drain while the block runs (main thread only;
        elsewhere, as in tests that run the app in a thread, signals are left alone)."""
        loop = asyncio.get_running_loop()
        previous: dict[int, Handler] = {}

        def hook(signum: int, frame: FrameType | None) -> None:
            handler = previous[signum]
            if self._task is not None:  # a second signal: straight to the server
                handler(signum, frame)
                return
            loop.call_soon_threadsafe(self.begin, lambda: handler(signum, None))

        try:
            for signum in SIGNALS:
                installed = signal.getsignal(signum)
                if callable(installed):  # the server's handler (uvicorn installs one)
                    previous[signum] = installed
                    signal.signal(signum, hook)
        except ValueError:  # not the main thread
            previous.clear()
        try:
            yield
        finally:
            for number, handler in previous.items():
                if signal.getsignal(number) is hook:
                    signal.signal(number, handler)


class DrainMiddleware:
    """Counts requests in flight; while draining adds ``Connection: close``; answers a request
    the drain cancelled with a JSON 503 (outermost middleware: it sees every request)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        drain = self.drain
        started = False

        async def send_closing(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if drain.draining:
                    message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
            await send(message)

        drain.enter(task)
        try:
            await self.app(scope, receive, send_closing)
        except asyncio.CancelledError:
            if not drain.was_cut(task) or started:
                raise
            task.uncancel()
            await send_closing({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"),
            ]})
            await send({"type": "http.response.body",
                        "body": orjson.dumps({"detail": SHUTTING_DOWN})})
        finally:
            drain.leave(task)
