"""`latentsieve index build|list` and `score`: good builds, bad input, corruption, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from latentsieve.cli import main
from latentsieve.index.bandwidth import AUTO_K
from latentsieve.index.build import BuildOptions, CalibrationRequest, build_version
from latentsieve.index.errors import StoreError
from latentsieve.index.store import INDEX_FILE, LatentStore
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import log_density_reference


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every path under root with its size and mtime: 'nothing stored changed' made checkable."""
    if not root.exists():
        return []
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
    )


@pytest.fixture
def latents() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (5, 6))
    return (centres[rng.integers(0, 5, 300)] + rng.normal(0, 0.5, (300, 6))).astype(np.float32)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def build(store: Path, source: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code, out, err = run(
        ["index", "build", "--store", str(store), "--model", "m", "--latents", str(source),
         "--no-progress", *extra],
        capsys,
    )
    assert code == 0, err
    return dict(json.loads(out))


def test_build_list_score_roundtrip(
    tmp_path: Path, latents: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "z.npy"
    np.save(source, latents.reshape(300, 2, 3))
    store = tmp_path / "store"
    first = build(store, source, capsys, "--sigma", "0.7")
    loaded = LatentStore(store).load("m")
    manifest = loaded.manifest
    assert (manifest.n, manifest.dim, manifest.latent_shape) == (300, 6, (2, 3))
    assert manifest.bandwidth.sigma == 0.7 and manifest.bandwidth.rule == "fixed"
    assert manifest.calibration.source == "leave_one_out" and manifest.calibration.count == 300
    assert set(manifest.files) == {INDEX_FILE, "calibration.npy", "calibration_indices.npy",
                                   "index.gemm.npy", "index.gemm_norms.npz"}
    np.testing.assert_array_equal(loaded.latents, latents)
    # Leave-one-out calibration equals the reference, each point scored without itself.
    rows = loaded.calibration_indices
    assert rows is not None
    want = np.sort(log_density_reference(latents[rows], latents, 0.7, exclude=rows))
    np.testing.assert_allclose(loaded.calibration_scores, want, atol=1e-4)

    second = build(store, source, capsys, "--sigma", "0.7")
    assert second["version"] > first["version"]
    assert LatentStore(store).versions("m") == [first["version"], second["version"]]
    code, out, _ = run(["index", "list", "--store", str(store)], capsys)
    rows_listed = json.loads(out)
    assert code == 0 and [r["newest"] for r in rows_listed] == [False, True]

    queries = tmp_path / "q.npy"
    np.save(queries, latents[:5].reshape(5, 2, 3) + 0.1)
    code, out, err = run(
        ["score", "--store", str(store), "--model", "m", "--latents", str(queries)], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    with SyncScorer(LatentStore(store).load("m")) as scorer:
        direct = scorer.score(latents[:5] + 0.1)
    got = [r["log_density"] for r in report["results"]]
    np.testing.assert_allclose(got, direct.log_density, rtol=0, atol=1e-12)
    assert report["index_version"] == second["version"] and report["exact"] is True
    assert report["accepted"] == [i for i, r in enumerate(report["results"]) if r["accept"]]

    out_npy = tmp_path / "scores.npy"
    assert main(["score", "--store", str(store), "--model", "m", "--latents", str(queries),
                 "--out", str(out_npy)]) == 0
    table = np.load(out_npy)
    np.testing.assert_allclose(table["log_density"], direct.log_density, atol=1e-12)


def test_pt_and_safetensors_give_the_same_index(
    tmp_path: Path, latents: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(torch.from_numpy(latents), tmp_path / "z.pt")
    save_file({"latents": latents}, str(tmp_path / "z.safetensors"))
    for name in ("z.pt", "z.safetensors"):
        store = tmp_path / name.replace(".", "_")
        build(store, tmp_path / name, capsys, "--sigma", "1")
        np.testing.assert_array_equal(LatentStore(store).load("m").latents, latents)


def test_sampler_calibration_and_seed_scoring(
    tmp_path: Path, latents: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "z.npy"
    np.save(source, latents)
    store = tmp_path / "store"
    build(store, source, capsys, "--sampler", "torch-cpu:float16", "--calibration-count", "500")
    manifest = LatentStore(store).load("m").manifest
    assert str(manifest.sampler) == "torch-cpu:float16:6"
    assert manifest.calibration.source == "sampler" and manifest.calibration.count == 500
    code, out, err = run(
        ["score", "--store", str(store), "--model", "m", "--seeds", "3-5"], capsys
    )
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["seed"] for r in results] == [3, 4, 5]
    draws = [
        torch.randn(6, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float16)
        for s in (3, 4, 5)
    ]
    want = log_density_reference(
        torch.stack(draws).float().numpy(), latents, manifest.bandwidth.sigma
    )
    np.testing.assert_allclose([r["log_density"] for r in results], want, atol=1e-4)


def test_auto_sigma_is_a_local_scale(
    tmp_path: Path, latents: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "z.npy"
    np.save(source, latents)
    build(tmp_path / "store", source, capsys)
    loaded = LatentStore(tmp_path / "store").load("m")
    bandwidth = loaded.manifest.bandwidth
    diameter = float(np.sqrt(((latents - latents.mean(0)) ** 2).sum(1)).max() * 2)
    assert bandwidth.rule == "knn_median" and bandwidth.k == AUTO_K
    assert bandwidth.sigma < 0.2 * diameter
    spread = np.quantile(loaded.calibration_scores, 0.9) - np.quantile(
        loaded.calibration_scores, 0.1
    )
    assert spread > 0.5  # scores separate dense from sparse latents
    global_scores = log_density_reference(latents[:50], latents, diameter)
    assert np.ptp(global_scores) < 0.2 * spread  # what a global scale would have given


def bad_cases(tmp_path: Path, latents: np.ndarray) -> dict[str, tuple[list[str], str]]:
    np.save(tmp_path / "nan.npy", np.where(np.arange(6) == 2, np.nan, latents))
    np.save(tmp_path / "inf.npy", np.where(np.arange(6) == 1, np.inf, latents))
    np.save(tmp_path / "flat.npy", latents[:, 0])
    np.save(tmp_path / "one.npy", latents[:1])
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY not really")
    (tmp_path / "z.csv").write_text("1,2\n3,4\n")
    torch.save({"a": torch.zeros(3, 2)}, tmp_path / "dict.pt")
    save_file({"a": latents, "b": latents}, str(tmp_path / "two.safetensors"))
    np.save(tmp_path / "good.npy", latents)
    good = str(tmp_path / "good.npy")
    return {
        "missing file": (["--latents", str(tmp_path / "nope.npy")], "no such file"),
        "nan": (["--latents", str(tmp_path / "nan.npy")], "finite"),
        "inf": (["--latents", str(tmp_path / "inf.npy")], "finite"),
        "1-D": (["--latents", str(tmp_path / "flat.npy")], "shape (N, ...)"),
        "N < 2": (["--latents", str(tmp_path / "one.npy")], "at least 2"),
        "strings": (["--latents", str(tmp_path / "text.npy")], "numeric"),
        "unreadable": (["--latents", str(tmp_path / "garbage.npy")], "cannot read"),
        "suffix": (["--latents", str(tmp_path / "z.csv")], "unsupported file type"),
        "pt dict": (["--latents", str(tmp_path / "dict.pt")], "one tensor"),
        "safetensors two": (["--latents", str(tmp_path / "two.safetensors")], "exactly one"),
        "unknown kind": (["--latents", good, "--kind", "annoy"], "unknown --kind"),
        "sigma zero": (["--latents", good, "--sigma", "0"], "--sigma"),
        "sigma negative": (["--latents", good, "--sigma", "-1"], "--sigma"),
        "sigma nan": (["--latents", good, "--sigma", "nan"], "--sigma"),
        "sigma text": (["--latents", good, "--sigma", "wide"], "--sigma"),
        "sigma subnormal": (["--latents", good, "--sigma", "5e-324"], "[1e-100, 1e100]"),
        "bad sampler": (["--latents", good, "--sampler", "cuda:float32"], "unknown sampler"),
        "sampler size": (["--latents", good, "--sampler", "torch-cpu:5"], "--sampler draws"),
        "bad generator": (["--latents", good, "--generator", "no such thing"], "--generator"),
        "missing module": (["--latents", good, "--generator", "nope_pkg.mod:f"], "cannot find"),
    }


def test_bad_build_input_exits_nonzero_with_one_line_and_writes_nothing(
    tmp_path: Path, latents: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    build(store, _save(tmp_path, latents), capsys)
    before = snapshot(store)
    for name, (args, message) in bad_cases(tmp_path, latents).items():
        code, out, err = run(
            ["index", "build", "--store", str(store), "--model", "m", "--no-progress", *args],
            capsys,
        )
        assert code == 2, name
        assert err.count("\n") == 1 and err.startswith("latentsieve: error: "), (name, err)
        assert message in err, (name, err)
        assert snapshot(store) == before, name


def _save(tmp_path: Path, latents: np.ndarray) -> Path:
    path = tmp_path / "base.npy"
    np.save(path, latents)
    return path


@pytest.mark.parametrize("model", ["../evil", "A", "a/b", "", "x" * 65, "."])
def test_bad_model_names_are_refused(
    tmp_path: Path, latents: np.ndarray, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _save(tmp_path, latents)
    code, _, err = run(
        ["index", "build", "--store", str(tmp_path / "s"), "--model", model,
         "--latents", str(source)],
        capsys,
    )
    assert code == 2 and "invalid model name" in err
    assert not (tmp_path / "s").exists() or snapshot(tmp_path / "s") == []


def test_failed_calibration_leaves_no_partial_version(tmp_path: Path, latents: np.ndarray) -> None:
    store = LatentStore(tmp_path / "store")

    def broken(request: CalibrationRequest) -> np.ndarray:
        raise RuntimeError("calibration crashed")

    options = BuildOptions(model="m", latents_file=_save(tmp_path, latents), progress=False)
    with pytest.raises(RuntimeError):
        build_version(store, options, broken)
    assert store.versions("m") == []
    assert list((tmp_path / "store" / ".staging").iterdir()) == []
    build_version(store, options, calibrate_build)
    assert len(store.versions("m")) == 1


@pytest.mark.parametrize("victim", [INDEX_FILE, "calibration.npy", "manifest.json"])
def test_corrupted_version_is_refused_at_load(
    tmp_path: Path, latents: np.ndarray, victim: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    version = build(store, _save(tmp_path, latents), capsys, "--sigma", "1")["version"]
    path = store / "m" / version / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch|invalid manifest"):
        LatentStore(store).load("m")
    code, _, err = run(["score", "--store", str(store), "--model", "m", "--seeds", "0-1"], capsys)
    assert code == 2 and ("checksum mismatch" in err or "invalid manifest" in err)


def test_score_input_errors(
    tmp_path: Path, latents: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    build(store, _save(tmp_path, latents), capsys, "--sigma", "1")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5), dtype=np.float32))
    cases = {
        "unknown model": (["--model", "nope", "--seeds", "0-1"], "unknown model"),
        "no sampler": (["--model", "m", "--seeds", "0-1"], "no sampler"),
        "bad seeds": (["--model", "m", "--seeds", "5-1"], "before the start"),
        "dimension": (["--model", "m", "--latents", str(tmp_path / "wrong.npy")], "latent shape"),
        "sigma": (["--model", "m", "--latents", str(tmp_path / "base.npy"), "--sigma", "-2"],
                  "sigma"),
    }
    for name, (args, message) in cases.items():
        code, _, err = run(["score", "--store", str(store), *args], capsys)
        assert code == 2 and message in err, (name, err)


def test_options_fall_back_to_environment_variables(
    tmp_path: Path, latents: np.ndarray, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/contract.md §4: every option has a LATENTSIEVE_<OPTION> variable."""
    monkeypatch.setenv("LATENTSIEVE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LATENTSIEVE_MODEL", "m")
    monkeypatch.setenv("LATENTSIEVE_LATENTS", str(_save(tmp_path, latents)))
    monkeypatch.setenv("LATENTSIEVE_SAMPLER", "torch-cpu")
    monkeypatch.setenv("LATENTSIEVE_CALIBRATION_COUNT", "100")
    monkeypatch.setenv("LATENTSIEVE_NO_PROGRESS", "1")
    assert main(["index", "build"]) == 0
    assert LatentStore(tmp_path / "store").load("m").manifest.calibration.count == 100
    capsys.readouterr()
    monkeypatch.delenv("LATENTSIEVE_LATENTS")
    monkeypatch.setenv("LATENTSIEVE_SEEDS", "7-8")
    assert main(["score"]) == 0
    assert [r["seed"] for r in json.loads(capsys.readouterr().out)["results"]] == [7, 8]
