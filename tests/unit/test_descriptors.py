"""psi, nu, delta (docs/contract.md §2) against closed forms, independent Jacobians and brute
force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from latentsieve.workers.demo_models.digits_vae import decoder
from latentsieve.workers.descriptors import (
    DescriptorEngine,
    counted_activations,
    jacobian_singular_values,
    latent_directions,
    local_complexity,
    projection_matrix,
    psi_nu,
)


def linear_generator(matrix: np.ndarray, bias: np.ndarray) -> nn.Module:
    layer = nn.Linear(matrix.shape[1], matrix.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(matrix))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer.eval()


def mlp(widths: tuple[int, ...], activation: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).eval()


def closed_form_nu(singular_values: np.ndarray) -> float:
    a = singular_values / singular_values.sum() + 1e-30
    return float(np.exp(-(a * np.log(a)).sum()))


@st.composite
def linear_maps(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """A = U diag(s) V^T with D >= E and condition number up to 1e8."""
    latent_dim = draw(st.integers(1, 6))
    output_dim = draw(st.integers(latent_dim, 10))
    log_condition = draw(st.floats(0.0, 8.0))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((output_dim, latent_dim)))
    v, _ = np.linalg.qr(rng.standard_normal((latent_dim, latent_dim)))
    exponents = rng.uniform(-log_condition / 2, log_condition / 2, latent_dim)
    exponents[0], exponents[-1] = log_condition / 2, -log_condition / 2
    s = 10.0 ** (exponents if latent_dim > 1 else exponents[:1])
    return (u * s) @ v.T, rng.standard_normal(output_dim)


@settings(max_examples=40, deadline=None)
@given(linear_maps(), st.integers(0, 2**31 - 1))
def test_linear_generator_closed_forms(
    linear: tuple[np.ndarray, np.ndarray], latent_seed: int
) -> None:
    matrix, bias = linear
    output_dim, latent_dim = matrix.shape
    engine = DescriptorEngine(linear_generator(matrix, bias), (latent_dim,), output_dim)
    assert engine.projection is None  # D <= m: P = I
    latents = np.random.default_rng(latent_seed).standard_normal((3, latent_dim))
    result = engine.compute(latents, {"psi", "nu", "delta"})

    singular_values = np.linalg.svd(matrix, compute_uv=False)
    log_scale = np.abs(np.log(singular_values)).sum()
    # 0.5 log det(A^T A) = log |det R| for A = QR; slogdet(R) avoids squaring cond(A) in A^T A.
    _, half_logdet = np.linalg.slogdet(np.linalg.qr(matrix, mode="r"))
    np.testing.assert_allclose(result["psi"], half_logdet, rtol=1e-8, atol=1e-12 + 1e-8 * log_scale)
    _, logdet = np.linalg.slogdet(matrix.T @ matrix)  # the literal form, exact up to cond(A)^2 eps
    condition = singular_values[0] / singular_values[-1]
    gram_error = latent_dim * condition**2 * np.finfo(np.float64).eps
    np.testing.assert_allclose(result["psi"], 0.5 * logdet, rtol=1e-8, atol=1e-8 + gram_error)
    np.testing.assert_allclose(result["nu"], closed_form_nu(singular_values), rtol=1e-8)
    assert result["delta"].dtype == np.int64
    assert (result["delta"] == 0).all()


def autograd_singular_values(
    generator: nn.Module, latent: torch.Tensor, projection: torch.Tensor | None
) -> np.ndarray:
    def projected(z: torch.Tensor) -> torch.Tensor:
        out = generator(z[None]).reshape(-1)
        return out if projection is None else projection.float() @ out

    jacobian = torch.autograd.functional.jacobian(projected, latent)
    return torch.linalg.svdvals(jacobian.double()).numpy()


@pytest.mark.parametrize("activation", [nn.ReLU, nn.LeakyReLU])
@pytest.mark.parametrize(
    ("widths", "m", "mode"),
    [((40, 64, 64, 200), 16, "reverse"), ((5, 32, 32, 30), 120, "forward")],
)
def test_singular_values_match_autograd_jacobian(
    activation: type[nn.Module], widths: tuple[int, ...], m: int, mode: str
) -> None:
    generator = mlp(widths, activation, seed=1)
    engine = DescriptorEngine(generator, (widths[0],), widths[-1], m=m, projection_seed=3, chunk=4)
    assert engine.mode == mode
    assert (engine.projection is not None) == (widths[-1] > m)
    latents = torch.randn(7, widths[0], generator=torch.Generator().manual_seed(2))
    fast = jacobian_singular_values(generator, latents, engine.projection, chunk=3, row_chunk=5)
    assert fast.dtype == torch.float64
    assert fast.shape == (7, min(widths[0], m, widths[-1]))
    for row, latent in enumerate(latents):
        expected = autograd_singular_values(generator, latent, engine.projection)
        np.testing.assert_allclose(fast[row].numpy(), expected, rtol=1e-4, atol=1e-6 * expected[0])


def test_projection_is_orthonormal_and_fixed_by_seed() -> None:
    first = projection_matrix(500, m=120, seed=7)
    again = projection_matrix(500, m=120, seed=7)
    other = projection_matrix(500, m=120, seed=8)
    assert first is not None and again is not None and other is not None
    assert first.shape == (120, 500)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(
        first @ first.T, torch.eye(120, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert projection_matrix(120, m=120, seed=7) is None


def pre_activations_by_hand(layers: nn.Sequential, point: torch.Tensor) -> torch.Tensor:
    """All activation inputs of a Sequential at one point, recorded without hooks."""
    seen = []
    x = point[None]
    for layer in layers:
        if isinstance(layer, (nn.ReLU, nn.LeakyReLU, nn.Tanh)):
            seen.append(x.reshape(-1).clone())
        x = layer(x)
    return torch.cat(seen)


def test_delta_matches_brute_force_count() -> None:
    torch.manual_seed(5)
    generator = nn.Sequential(
        nn.Linear(3, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.LeakyReLU(0.1),
        nn.Linear(16, 12),
        nn.Tanh(),
        nn.Linear(12, 4),
    ).eval()
    directions = latent_directions(3, count=3, seed=11).float()
    radius = 0.4
    latents = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    fast = local_complexity(generator, latents, directions, radius, chunk=4)
    expected = []
    with torch.no_grad():
        for z in latents:
            centre = pre_activations_by_hand(generator, z) > 0
            changed = torch.zeros_like(centre)
            for direction in directions:
                for sign in (1.0, -1.0):
                    vertex = pre_activations_by_hand(generator, z + sign * radius * direction) > 0
                    changed |= vertex != centre
            expected.append(int(changed.sum()))
    assert fast.tolist() == expected
    assert max(expected) > 0  # the check is not vacuous
    engine = DescriptorEngine(generator, (3,), 4, delta_directions=3, delta_radius=radius)
    engine.directions = directions
    assert engine.compute(latents, {"delta"})["delta"].tolist() == expected


def test_hooks_are_removed_even_on_error() -> None:
    class Failing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    generator = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), Failing()).eval()
    with pytest.raises(RuntimeError, match="boom"):
        local_complexity(generator, torch.zeros(2, 2), torch.eye(2), 0.1)
    assert all(not module._forward_hooks for module in counted_activations(generator))


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_psi_is_a_sum_of_logs(scale: float) -> None:
    diagonal = np.array([1.0, 2.0, 3.0]) * scale  # their product over/underflows float64
    generator = linear_generator(np.diag(diagonal), np.zeros(3))
    result = DescriptorEngine(generator, (3,), 3).compute(np.ones((2, 3)), {"psi", "nu"})
    expected = float(np.log(diagonal).sum())
    assert math.isfinite(expected)
    np.testing.assert_allclose(result["psi"], expected, rtol=1e-12)
    np.testing.assert_allclose(result["nu"], closed_form_nu(np.array([3.0, 2.0, 1.0])), rtol=1e-12)


def test_psi_nu_with_extreme_spread_and_zero_singular_values() -> None:
    psi, nu = psi_nu(
        torch.tensor([[1e200, 1e-200], [1e300, 1e300], [0.0, 0.0]], dtype=torch.float64)
    )
    assert torch.isfinite(psi).all() and torch.isfinite(nu).all()
    np.testing.assert_allclose(psi[0].item(), math.log(1e200) + math.log(1e-200), atol=1e-9)
    np.testing.assert_allclose(psi[1].item(), 2 * math.log(1e300), rtol=1e-12)
    np.testing.assert_allclose(nu[1].item(), 2.0, rtol=1e-12)  # sum(s) overflows; a_i does not
    assert psi[2].item() == 0.0  # no non-zero singular value: the empty sum
    # The rank cut drops singular values below rtol * max(s).
    cut, _ = psi_nu(torch.tensor([[1e200, 1e-200]], dtype=torch.float64), rtol=1e-15)
    np.testing.assert_allclose(cut[0].item(), math.log(1e200), rtol=1e-12)


def test_demo_decoder_descriptors_are_finite_and_deterministic() -> None:
    latents = np.random.default_rng(0).standard_normal((24, 8)).astype(np.float32)
    names = {"psi", "nu", "delta"}
    first = DescriptorEngine(decoder(), (8,), 64).compute(latents, names)
    second = DescriptorEngine(decoder(), (8,), 64).compute(latents, names)
    assert set(first) == names
    for name in names:
        assert first[name].shape == (24,)
        assert np.isfinite(first[name]).all()
        np.testing.assert_array_equal(first[name], second[name])
    assert (first["nu"] >= 1.0).all() and (first["nu"] <= 8.0 + 1e-9).all()
    assert (first["delta"] > 0).any()


def test_unknown_descriptor_and_wrong_shape_are_rejected() -> None:
    engine = DescriptorEngine(decoder(), (8,), 64)
    with pytest.raises(ValueError, match="allowed"):
        engine.compute(np.zeros((1, 8), np.float32), {"psi", "curvature"})
    with pytest.raises(ValueError, match="do not match"):
        engine.compute(np.zeros((1, 9), np.float32), {"psi"})
    empty = engine.compute(np.zeros((0, 8), np.float32), {"psi", "nu", "delta"})
    assert all(value.shape == (0,) for value in empty.values())


def test_tiny_autoencoder_kl_adapter() -> None:
    # diffusers is in the dev extra: a missing install fails here rather than skipping.
    from latentsieve.workers.generators import tiny_autoencoder_kl

    generator = tiny_autoencoder_kl()
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = generator(latents)
    assert images.shape == (2, 3, 32, 32)
    engine = DescriptorEngine(generator, (4, 4, 4), 3 * 32 * 32, chunk=2)
    assert engine.mode == "forward" and engine.projection is not None
    result = engine.compute(latents, {"psi", "nu", "delta"})
    for name in ("psi", "nu", "delta"):
        assert result[name].shape == (2,) and np.isfinite(result[name]).all()
    assert (result["delta"] > 0).all()
    # Forward mode (the automatic choice, E=64 <= 120) and reverse mode see the same Jacobian.
    forward = jacobian_singular_values(generator, latents, engine.projection)
    reverse = jacobian_singular_values(generator, latents, engine.projection, mode="reverse")
    np.testing.assert_allclose(forward.numpy(), reverse.numpy(), rtol=1e-4, atol=1e-7)


def test_toy_cpwl_generator_is_fixed_and_piecewise_linear() -> None:
    from latentsieve.workers.generators import toy_cpwl_generator

    first, second = toy_cpwl_generator(), toy_cpwl_generator()
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    latents = np.random.default_rng(1).standard_normal((16, 2))
    result = DescriptorEngine(first, (2,), 3).compute(latents, {"psi", "nu", "delta"})
    assert all(np.isfinite(value).all() for value in result.values())
    assert (result["nu"] <= 2.0 + 1e-9).all()  # rank of a 3 x 2 Jacobian


def test_a_read_only_batch_is_scored_without_sharing_its_buffer() -> None:
    """A read-only array (a memory map, a decoded body) is copied before torch sees it: torch
    calls a tensor over a read-only buffer undefined and warns; the scores are the same."""
    import warnings

    generator = linear_generator(np.diag([1.0, 2.0, 3.0]), np.zeros(3))
    latents = np.ones((2, 3))
    latents.flags.writeable = False
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not writable")  # torch's warning fails it
        result = DescriptorEngine(generator, (3,), 3).compute(latents, {"psi"})
    np.testing.assert_allclose(result["psi"], math.log(6.0), rtol=1e-12)
