"""``--device auto|cpu|cuda[:I]``: resolved against the machine, and it reaches the engine,
the descriptors, ``/models``, ``/metrics`` and the CLI. Exercised on the CPU (this machine has
no GPU); the CUDA branches run with a stated device count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serve_app

from latentsieve.cli import main
from latentsieve.index.ivf_lists import faiss_has_gpu
from latentsieve.index.store import LatentStore
from latentsieve.service.offline import SyncScorer
from latentsieve.service.settings import Settings
from latentsieve.workers.density import DensityEngine
from latentsieve.workers.devices import resolve_device

MODEL = "digits-vae"


@pytest.mark.parametrize(
    ("spec", "count", "want"),
    [
        ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("CPU", 0, "cpu"),
        ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"),
    ],
)
def test_resolve_device(spec: str, count: int, want: str) -> None:
    assert resolve_device(spec, cuda_devices=count) == want


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        ("cuda", 0, "has no CUDA device"), ("cuda:2", 2, "CUDA devices 0..1"),
        ("gpu", 1, "must be auto, cpu, cuda or cuda:I"), ("cuda:-1", 1, "must be auto"),
    ],
)
def test_unavailable_or_bad_devices_are_refused(spec: str, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_device(spec, cuda_devices=count)


def test_this_machine_resolves_auto_to_what_torch_sees() -> None:
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    if not torch.cuda.is_available():
        assert not faiss_has_gpu()  # faiss-cpu here


def test_the_device_reaches_the_engines(store_root: Path) -> None:
    with SyncScorer(LatentStore(store_root).load(MODEL), device="cpu") as scorer:
        engine = scorer.served.shards[0].engine
        assert isinstance(engine, DensityEngine) and engine.device.type == "cpu"
        assert scorer.descriptor_engine is not None
        assert scorer.descriptor_engine.device.type == "cpu"
    if not torch.cuda.is_available():  # a device this machine does not have: one line
        with pytest.raises(ValueError, match="has no CUDA device"):
            SyncScorer(LatentStore(store_root).load(MODEL), device="cuda:0")


@pytest.mark.anyio
async def test_models_and_metrics_say_which_device_scores(store_root: Path) -> None:
    settings = Settings(store=store_root, reload_interval_s=60.0, device="cpu", cache_bytes=0)
    async with serve_app(settings) as client:
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        assert models[MODEL]["compute"] == {"mode": "embedded", "device": "cpu"}
        assert models[MODEL]["shards"] == 1
        response = await client.post("/score", json={"model": MODEL, "seeds": [1, 2, 3]})
        assert response.status_code == 200
        metrics = (await client.get("/metrics")).text
    series = [
        line for line in metrics.splitlines()
        if line.startswith('latentsieve_compute_seconds_count{') and f'model="{MODEL}"' in line
    ]
    assert len(series) == 1 and 'device="cpu"' in series[0] and float(series[0].split()[-1]) >= 1


def test_cli_score_device(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--store", str(store_root), "--model", MODEL, "--seeds", "0-3",
                 "--device", "cpu"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert main(["score", "--store", str(store_root), "--model", MODEL, "--seeds", "0-3",
                 "--device", "auto"]) == 0
    auto = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(
        [r["log_density"] for r in cpu["results"]], [r["log_density"] for r in auto["results"]]
    )
    if not torch.cuda.is_available():
        assert main(["score", "--store", str(store_root), "--model", MODEL, "--seeds", "0-3",
                     "--device", "cuda"]) == 2
        assert "has no CUDA device" in capsys.readouterr().err
    assert main(["score", "--store", str(store_root), "--model", MODEL, "--seeds", "0-3",
                 "--device", "tpu"]) == 2
    assert "--device must be" in capsys.readouterr().err


def test_serve_refuses_an_absent_device_with_one_line(
    store_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.fail("this test asserts the no-GPU answer; run it on a machine without CUDA")
    assert main(["serve", "--store", str(store_root), "--device", "cuda:0", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("latentsieve: error: --device cuda:0")
