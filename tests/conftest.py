"""Shared fixtures: a store with the demo model and a model without a sampler, the app
in-process (its lifespan entered) and a throwaway Redis server."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from latentsieve.demo import ensure_demo_index
from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.store import LatentStore
from latentsieve.service.app import create_app
from latentsieve.service.settings import Settings
from latentsieve.workers.calibration import calibrate_build

NOSAMPLER = "nosampler"
NOSAMPLER_DIM = 6
REDIS_SERVER = "/usr/bin/redis-server"
STARTED: list[subprocess.Popen[bytes]] = []  # every redis-server this session started


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """Tests stop what they start: a redis-server still running at the end fails the session
    (and is stopped here, so a failing run leaves nothing behind either)."""
    yield
    left = [process for process in STARTED if process.poll() is None]
    for process in left:
        process.kill()
        process.wait(timeout=10)
    if left:
        pytest.fail(f"{len(left)} redis-server process(es) left running by the tests: "
                    f"{[process.args for process in left]}")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_nosampler(root: Path, seed: int = 0) -> str:
    """A version of ``nosampler`` (300 x 6 Gaussian latents, sigma 1, leave-one-out)."""
    source = root.parent / f"nosampler-{seed}.npy"
    rng = np.random.default_rng(seed)
    np.save(source, rng.standard_normal((300, NOSAMPLER_DIM)).astype(np.float32))
    options = BuildOptions(
        model=NOSAMPLER, latents_file=source, sigma="1.0", calibration_count=300, progress=False
    )
    return build_version(LatentStore(root), options, calibrate_build).name


@pytest.fixture
def new_nosampler_version() -> Callable[[Path, int], str]:
    """``build_nosampler``, for tests that publish versions while the app runs."""
    return build_nosampler


@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding ``digits-vae`` (d=8, sampler) and ``nosampler`` (d=6, no sampler)."""
    root = tmp_path_factory.mktemp("base") / "store"
    root.mkdir()
    ensure_demo_index(root)
    build_nosampler(root)
    return root


def store_listing(root: Path) -> dict[str, int]:
    """Every path under the store with its mtime (ns): equal before and after = untouched."""
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


@contextlib.asynccontextmanager
async def serve_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app for ``settings`` with its lifespan entered, behind an httpx client."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


ServeApp = Callable[[Settings], contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def serve() -> ServeApp:
    """``async with serve(settings) as client``: an app with settings of the test's own."""
    return serve_app


@pytest.fixture
def snapshot_store() -> Callable[[Path], dict[str, int]]:
    """``store_listing``, for tests that check a request left the store untouched."""
    return store_listing


@pytest.fixture
def settings(store_root: Path) -> Settings:
    """Default settings over the shared store; tests copy it with ``model_copy(update=...)``."""
    return Settings(store=store_root, reload_interval_s=60.0)


@pytest.fixture
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_app(settings) as client:
        yield client


def start_redis(
    folder: Path, port: int, extra_args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``redis-server`` on ``port`` (loopback, no persistence: a restart loses every stream and
    group), once it accepts connections; ``extra_args`` are more server options (e.g.
    ``--aclfile FILE``)."""
    if not Path(REDIS_SERVER).exists() and shutil.which("redis-server") is None:
        # A failure, not a skip: `make test` installs redis-server, so its absence is a bug.
        pytest.fail("redis-server is not installed (make system-deps installs it)")
    binary = REDIS_SERVER if Path(REDIS_SERVER).exists() else str(shutil.which("redis-server"))
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    STARTED.append(process)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private ``redis-server`` (no persistence) on a free port: (url, process)."""
    port = free_port()
    process = start_redis(workdir, port)
    try:
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private ``redis-server`` for the session; killed at the end."""
    with running_redis(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


@pytest.fixture
def private_redis() -> Callable[[Path], contextlib.AbstractContextManager[
    tuple[str, subprocess.Popen[bytes]]
]]:
    """``with private_redis(tmp_path) as (url, process)``: a Redis a test may kill."""
    return running_redis


def load_observability() -> ModuleType:
    """``docker/observability.py`` (the dashboard and alert-rule generator; not a package)."""
    name = "docker_observability"
    path = Path(__file__).resolve().parents[1] / "docker" / "observability.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module
