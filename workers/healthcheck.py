"""Container health probe of a worker: its ``/metrics`` answers and it serves a model shard.

    python -m latentsieve.workers.healthcheck [PORT]    # exit 0 healthy, 1 not

``PORT`` defaults to ``LATENTSIEVE_METRICS_PORT``, else 9100. Healthy means the worker's own
metrics server answers within 2 s and shows ``latentsieve_worker_up{...} 1.0`` for at least one
model shard (docs/contract.md §6): the process is up and has loaded what it serves. Standard library
only, so the probe costs no import of torch or FAISS.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.request

DEFAULT_PORT = 9100
_UP = re.compile(r"^latentsieve_worker_up\{[^}]*\} 1(\.0)?$", re.MULTILINE)


def healthy(exposition: str) -> bool:
    """Whether a worker's metrics text shows at least one served model shard."""
    return _UP.search(exposition) is not None


def probe(port: int, timeout_s: float = 2.0) -> str | None:
    """None when the worker on ``port`` is healthy, else why not (one line)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError as exc:
        return f"worker metrics on port {port} do not answer: {exc}"
    return None if healthy(text) else "the worker serves no model shard yet"


def main(argv: list[str]) -> int:
    port = int(argv[0]) if argv else int(os.environ.get("LATENTSIEVE_METRICS_PORT", DEFAULT_PORT))
    problem = probe(port)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
