"""Local geometry descriptors ``psi``, ``nu``, ``delta`` of a generator at given latents.

Humayun et al., "Understanding the Local Geometry of Generative Model Manifolds" (2024), for a
generator ``G: R^E -> R^D`` (docs/contract.md §2). ``J`` is the Jacobian of ``P·G`` at a latent
``z``, with
``P`` ``m x D`` random orthonormal rows fixed per model by a seed (``P = I`` when ``D <= m``):

    psi(z)   = sum_{s_i > tol} log s_i                        local scaling   [nats]
    nu(z)    = exp( -sum_i a_i log a_i ),  a_i = s_i / sum_j s_j + 1e-30      local rank
    delta(z) = #{neurons whose pre-activation sign at some vertex z ± r v_k differs from z}

``s_i`` are the singular values of ``J`` (float64 SVD); ``v_k`` are ``P_dirs`` random orthonormal
latent directions (a cross-polytope of radius ``r`` around ``z``). ``psi`` is a sum of logs, never a
product of singular values, so it stays finite for singular values like 1e200 and 1e-200.

Jacobians use ``torch.func``: reverse mode (``vmap(jacrev)``: one VJP per row of ``P·G``) when the
latent is larger than the projected output (``E > m'``), forward mode (``vmap(jacfwd)``: one JVP
per latent coordinate) otherwise, whichever needs fewer passes. Both are batched over a chunk of
latents and, optionally, over chunks of rows/coordinates to bound memory. ``G`` must treat the
rows of a batch independently (any eval-mode network without cross-sample ops does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import jacrev, jvp, vmap

from latentsieve.index.manifest import DEFAULT_DELTA_DIRECTIONS, DEFAULT_PROJECTION_ROWS
from latentsieve.index.manifest import DESCRIPTOR_NAMES as MANIFEST_DESCRIPTOR_NAMES

JacobianMode = Literal["auto", "forward", "reverse"]
DESCRIPTOR_NAMES = frozenset(MANIFEST_DESCRIPTOR_NAMES)
# Random projection rows of P (docs/contract.md §2); Humayun et al. project high-dimensional
# outputs too.
# r = DELTA_RADIUS_FRACTION * sqrt(E): a fixed fraction of the typical norm of a N(0, I) latent.
DELTA_RADIUS_FRACTION = 0.1
# Added to every normalised singular value before the log in nu, exactly as docs/contract.md §2.
NU_EPSILON = 1e-30
# The latent directions draw from the model seed shifted by this, so they differ from P's stream.
_DIRECTION_SEED_OFFSET = 1_000_003

# Activations whose pre-activation sign is their region boundary (ReLU family: the kink at 0) or
# their centre of symmetry/curvature (smooth ones). Hardtanh, ReLU6, Hardsigmoid and Hardswish are
# not counted: their kinks are not at 0, so a sign test would count the wrong boundary.
COUNTED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softsign,
)


def random_orthonormal_rows(
    rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``(rows, cols)`` with orthonormal rows (``rows <= cols``), Haar-random, a function of seed.

    QR of a ``(cols, rows)`` Gaussian drawn on the CPU by a seeded ``torch.Generator`` (so the same
    on every device), columns sign-fixed by ``sign(diag(R))`` so the factorisation is unique.
    Computed in float64 (``8 * rows * cols`` bytes transiently), returned in ``dtype``.
    """
    if not 0 < rows <= cols:
        raise ValueError(f"need 0 < rows <= cols, got rows={rows}, cols={cols}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(cols, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.contiguous().to(dtype)


def projection_matrix(
    output_dim: int, m: int = DEFAULT_PROJECTION_ROWS, seed: int = 0
) -> torch.Tensor | None:
    """``P``: ``(m, D)`` float64 random orthonormal rows for ``D = output_dim``; ``None`` (P = I)
    when ``D <= m`` (docs/contract.md §2)."""
    if output_dim <= m:
        return None
    return random_orthonormal_rows(m, output_dim, seed)


def latent_directions(
    latent_dim: int, count: int = DEFAULT_DELTA_DIRECTIONS, seed: int = 0
) -> torch.Tensor:
    """``(P_dirs, E)`` float64 orthonormal latent directions spanning delta's cross-polytope."""
    return random_orthonormal_rows(count, latent_dim, seed + _DIRECTION_SEED_OFFSET)


def jacobian_mode(latent_dim: int, rows: int) -> Literal["forward", "reverse"]:
    """``"reverse"`` (``rows`` VJPs) when ``E > rows`` else ``"forward"`` (``E`` JVPs)."""
    return "reverse" if latent_dim > rows else "forward"


def jacobian_singular_values(
    generator: nn.Module,
    latents: torch.Tensor,
    projection: torch.Tensor | None = None,
    chunk: int = 16,
    row_chunk: int | None = None,
    mode: JacobianMode = "auto",
) -> torch.Tensor:
    """Singular values of ``J = d(P·G)/dz`` at each latent: ``(n, *latent_shape)`` ->
    ``(n, min(E, m'))`` float64, descending (Humayun et al. 2024: the spectrum behind psi, nu).

    ``projection`` is ``(m', D)`` (``None``: ``P = I``, ``m' = D``); ``E = prod(latent_shape)``.
    ``mode="auto"``: reverse mode when ``E > m'``, forward mode otherwise (:func:`jacobian_mode`),
    falling back to reverse mode when an op of ``generator`` has no forward-mode derivative.
    ``chunk`` latents share one batched pass; ``row_chunk`` bounds the VJPs/JVPs run at once
    (None: all).
    ``J`` is computed in the latents' dtype on their device, the SVD in float64.
    """
    latent_shape = tuple(latents.shape[1:])
    latent_dim = math.prod(latent_shape)
    proj = None if projection is None else projection.to(latents.device, latents.dtype)

    def projected(z_flat: torch.Tensor) -> torch.Tensor:
        out = generator(z_flat.reshape(1, *latent_shape)).reshape(-1)
        return out if proj is None else proj @ out

    with torch.no_grad():
        probe = torch.zeros(1, *latent_shape, dtype=latents.dtype, device=latents.device)
        rows = proj.shape[0] if proj is not None else int(generator(probe).numel())
    if latents.shape[0] == 0:
        return torch.zeros(0, min(latent_dim, rows), dtype=torch.float64, device=latents.device)
    reverse_fn = vmap(jacrev(projected, chunk_size=row_chunk))
    chosen = jacobian_mode(latent_dim, rows) if mode == "auto" else mode
    # Built only when used: its (E, E) tangent basis is large for big latents.
    forward_fn = (
        vmap(_jacfwd_chunked(projected, latent_dim, row_chunk, latents))
        if chosen == "forward"
        else None
    )
    use_forward = chosen == "forward"
    flat = latents.reshape(latents.shape[0], latent_dim)
    pieces = []
    # torch.func transforms still differentiate under no_grad; plain autograd records nothing.
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            block = flat[start : start + chunk]
            if use_forward and forward_fn is not None:
                try:
                    jac = forward_fn(block)  # (c, m', E)
                except NotImplementedError:  # an op without forward AD (e.g. fused attention)
                    if mode == "forward":
                        raise
                    use_forward = False
            if not use_forward:
                jac = reverse_fn(block)
            pieces.append(torch.linalg.svdvals(jac.double()))
    return torch.cat(pieces)


def _jacfwd_chunked(
    fn: Callable[[torch.Tensor], torch.Tensor],
    latent_dim: int,
    row_chunk: int | None,
    like: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``jacfwd`` with ``chunk_size``: ``z (E,) -> J (m', E)`` from ``vmap`` over ``E`` JVPs."""
    basis = torch.eye(latent_dim, dtype=like.dtype, device=like.device)

    def jacobian(z: torch.Tensor) -> torch.Tensor:
        def column(tangent: torch.Tensor) -> torch.Tensor:
            return jvp(fn, (z,), (tangent,))[1]

        return vmap(column, chunk_size=row_chunk)(basis).T  # (E, m') -> (m', E)

    return jacobian


def rank_tolerance(latent_dim: int, rows: int, dtype: torch.dtype) -> float:
    """Relative threshold ``max(E, m') * eps(dtype)`` below which ``s_i / max(s)`` counts as zero.

    The usual numerical-rank cut (NumPy ``matrix_rank``): singular values of a Jacobian computed in
    ``dtype`` carry absolute rounding of about ``max(s) * max(E, m') * eps``, so anything smaller
    is indistinguishable from 0.
    """
    return max(latent_dim, rows) * torch.finfo(dtype).eps


def psi_nu(singular_values: torch.Tensor, rtol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, k)`` singular values -> ``psi`` ``(n,)`` and ``nu`` ``(n,)`` float64 (docs/contract.md
    §2).

    psi = sum over s_i > rtol * max(s) of log s_i (local scaling, Humayun et al. 2024; a sum of
    logs, never a product; 0 when no singular value is non-zero). Pass
    ``rtol = rank_tolerance(E, m', jacobian dtype)``; the default 0 keeps every positive s_i.
    nu = exp(-sum_i a_i log a_i), a_i = s_i / sum_j s_j + 1e-30 over all k values (local rank;
    a_i = 1e-30 when every s_i is 0). Sums run on the largest-first ratios to avoid overflow.
    """
    s = singular_values.double()
    largest = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.sum(dim=-1, keepdim=True)
    nonzero = (s > rtol * largest) & (s > 0)
    psi = torch.where(nonzero, torch.log(torch.where(nonzero, s, 1.0)), 0.0).sum(dim=-1)
    # s / sum(s) computed as (s / max) / sum(s / max): finite even when sum(s) overflows float64.
    safe_largest = torch.where(largest > 0, largest, 1.0)
    scaled = s / safe_largest
    total = scaled.sum(dim=-1, keepdim=True)
    a = torch.where(total > 0, scaled / torch.where(total > 0, total, 1.0), 0.0) + NU_EPSILON
    nu = torch.exp(-(a * torch.log(a)).sum(dim=-1))
    return psi, nu


def counted_activations(generator: nn.Module) -> list[nn.Module]:
    """The modules of ``generator`` whose inputs delta counts (:data:`COUNTED_ACTIVATIONS`)."""
    excluded = (nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish)  # ReLU6 subclasses Hardtanh
    return [
        module
        for module in generator.modules()
        if isinstance(module, COUNTED_ACTIVATIONS) and not isinstance(module, excluded)
    ]


def supports_delta(generator: nn.Module) -> bool:
    """False for TorchScript generators: their compiled graph never calls Python forward hooks
    (``register_forward_hook`` is refused on ScriptModules), so delta cannot be counted."""
    return not any(isinstance(module, torch.jit.ScriptModule) for module in generator.modules())


@contextmanager
def _sign_change_counter(
    modules: Sequence[nn.Module], points_per_latent: int, counts: list[torch.Tensor]
) -> Iterator[None]:
    """Forward hooks appending, per call, ``(c,)`` sign-change counts; removed on exit or error."""

    def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        pre = inputs[0]
        signs = (pre > 0).reshape(-1, points_per_latent, pre[0].numel())  # (c, 2P+1, F)
        changed = (signs[:, 1:] != signs[:, :1]).any(dim=1)  # (c, F)
        counts.append(changed.sum(dim=1))

    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def local_complexity(
    generator: nn.Module,
    latents: torch.Tensor,
    directions: torch.Tensor,
    radius: float,
    chunk: int = 16,
) -> torch.Tensor:
    """delta: ``(n, *latent_shape)`` -> ``(n,)`` int64 (local complexity, Humayun et al. 2024).

    Counts the neurons (elements of the inputs of :func:`counted_activations`, every call of a
    reused module counted separately) whose pre-activation sign (``x > 0``) at some vertex
    ``z ± radius * v_k`` differs from the sign at ``z``. ``directions`` is ``(P, E)`` orthonormal.
    The ``2P + 1`` points of ``chunk`` latents go through one batched forward pass.
    """
    n = latents.shape[0]
    latent_shape = tuple(latents.shape[1:])
    flat = latents.reshape(n, directions.shape[1])
    offsets = radius * directions.to(flat.device, flat.dtype)
    offsets = torch.cat([torch.zeros_like(offsets[:1]), offsets, -offsets])  # (2P+1, E)
    points_per_latent = offsets.shape[0]
    modules = counted_activations(generator)
    result = torch.zeros(n, dtype=torch.int64, device=latents.device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            block = flat[start : start + chunk]
            points = (block[:, None, :] + offsets[None]).reshape(-1, *latent_shape)
            counts: list[torch.Tensor] = []
            with _sign_change_counter(modules, points_per_latent, counts):
                generator(points)
            if counts:
                result[start : start + block.shape[0]] = torch.stack(counts).sum(dim=0)
    return result


class DescriptorEngine:
    """psi, nu, delta of one model's generator, with its projection and directions fixed by seed.

    ``generator`` maps ``(n, *latent_shape)`` to ``(n, *output)`` with ``prod(output) =
    output_dim``; it is put in eval mode and used on the device (and dtype) of its parameters.
    ``delta_radius`` defaults to ``0.1 * sqrt(E)``: a N(0, I) latent has norm ~ sqrt(E), so the
    cross-polytope is the same 10 % of the latent's scale (about 7 % of the distance between two
    independent latents) for any latent size. ``chunk`` latents share one batched pass;
    ``row_chunk`` bounds the VJPs/JVPs run at once (None: all rows of a chunk together).
    """

    def __init__(
        self,
        generator: nn.Module,
        latent_shape: Sequence[int],
        output_dim: int,
        m: int = DEFAULT_PROJECTION_ROWS,
        projection_seed: int = 0,
        delta_directions: int = DEFAULT_DELTA_DIRECTIONS,
        delta_radius: float | None = None,
        chunk: int = 16,
        row_chunk: int | None = None,
    ) -> None:
        self.generator = generator.eval()
        self.available = (
            DESCRIPTOR_NAMES if supports_delta(generator) else DESCRIPTOR_NAMES - {"delta"}
        )
        self.latent_shape = tuple(int(size) for size in latent_shape)
        self.latent_dim = math.prod(self.latent_shape)
        self.output_dim = int(output_dim)
        self.chunk = chunk
        self.row_chunk = row_chunk
        parameter = next(iter(generator.parameters()), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        self.dtype = parameter.dtype if parameter is not None else torch.float32
        projection = projection_matrix(self.output_dim, m, projection_seed)
        self.projection = None if projection is None else projection.to(self.device, self.dtype)
        self.rows = self.output_dim if projection is None else m
        self.directions = latent_directions(
            self.latent_dim, min(delta_directions, self.latent_dim), projection_seed
        ).to(self.device, self.dtype)
        self.delta_radius = (
            DELTA_RADIUS_FRACTION * math.sqrt(self.latent_dim)
            if delta_radius is None
            else float(delta_radius)
        )

    @property
    def mode(self) -> Literal["forward", "reverse"]:
        """``"reverse"`` or ``"forward"``: the Jacobian mode this model's shapes select."""
        return jacobian_mode(self.latent_dim, self.rows)

    def compute(self, latents: np.ndarray | torch.Tensor, names: set[str]) -> dict[str, np.ndarray]:
        """``(n, *latent_shape)`` -> ``{name: (n,)}``: psi (nats), nu float64; delta int64."""
        unknown = set(names) - DESCRIPTOR_NAMES
        if unknown:
            raise ValueError(
                f"unknown descriptor(s) {sorted(unknown)}; allowed: {sorted(DESCRIPTOR_NAMES)}"
            )
        if isinstance(latents, np.ndarray) and not latents.flags.writeable:
            # A read-only array (a memory map, a decoded request body): a tensor sharing its
            # buffer is undefined behaviour to torch (it warns). Copy it: small next to the
            # Jacobians.
            latents = latents.copy()
        batch = torch.as_tensor(latents).to(self.device, self.dtype)
        if tuple(batch.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents of shape {tuple(batch.shape)} do not match (n, *{self.latent_shape})"
            )
        missing = set(names) - self.available
        if missing:
            raise ValueError(
                "delta needs an eager nn.Module generator (TorchScript modules cannot carry "
                "forward hooks); give the generator as an import path package.module:factory"
            )
        results: dict[str, np.ndarray] = {}
        if names & {"psi", "nu"}:
            singular_values = jacobian_singular_values(
                self.generator, batch, self.projection, self.chunk, self.row_chunk
            )
            rtol = rank_tolerance(self.latent_dim, self.rows, self.dtype)
            psi, nu = psi_nu(singular_values, rtol)
            if "psi" in names:
                results["psi"] = psi.cpu().numpy()
            if "nu" in names:
                results["nu"] = nu.cpu().numpy()
        if "delta" in names:
            delta = local_complexity(
                self.generator, batch, self.directions, self.delta_radius, self.chunk
            )
            results["delta"] = delta.cpu().numpy()
        return results
