"""An SE(3)-equivariant, chirality-aware denoiser for molecules on e3nn (Geiger & Smidt 2022).

Message passing on the fully connected graph of each molecule, as in Tensor Field Networks
(Thomas et al. 2018) and NequIP (Batzner et al. 2022, Eq. 3): a message is the tensor product of
the sender's features with the spherical harmonics ``Y(r_ij)`` of the edge vector, its weights
given by an MLP of a radial basis of ``|r_ij|``; features pass gated nonlinearities (Weiler et al.
2018). The hidden irreps carry both parities, so parity-odd paths (``1o x 1o -> 1e``,
``1e x 1o -> 0o``) build pseudovectors and pseudoscalars (triple products). The output sums each
true quantity with its pseudo counterpart (``1o + 1e`` for positions, ``0e + 0o`` for atom
features): equivariant under rotations and translations, but not under reflections, so the
network tells enantiomers apart (an E(3)-equivariant network cannot).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import Tensor, nn

from ..core import State, ZeroCoM
from ._backbone import node_inputs
from ._egnn import full_edges

_ZERO_COM = ZeroCoM()


class _Convolution(nn.Module):
    """``out_i = Lin_sc(f_i) + Lin_2( sum_j TP(Lin_1(f_j), Y(r_ij); R(|r_ij|)) / sqrt(k) )``
    (NequIP, Batzner et al. 2022, Eq. 3; e3nn's ``Convolution``), ``k`` the mean neighbour count.

    Shapes: ``f [N, irreps_in.dim]``, ``sh [E, irreps_sh.dim]``, ``radial [E, basis]`` ->
    ``[N, irreps_out.dim]``.
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_out: o3.Irreps, basis: int,
                 radial_hidden: int, num_neighbors: float) -> None:
        super().__init__()
        self.irreps_in, self.irreps_out = irreps_in, irreps_out
        self.num_neighbors = num_neighbors
        self.sc = o3.Linear(irreps_in, irreps_out)
        self.lin1 = o3.Linear(irreps_in, irreps_in)
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_edge) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_edge:
                    if ir_out in irreps_out:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid, perm, _ = o3.Irreps(mid).sort()
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
        self.tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid, instructions,
                                   internal_weights=False, shared_weights=False)
        self.radial = FullyConnectedNet([basis, radial_hidden, self.tp.weight_numel], F.silu)
        self.lin2 = o3.Linear(irreps_mid.simplify(), irreps_out)

    def forward(self, f: Tensor, row: Tensor, col: Tensor, sh: Tensor, radial: Tensor) -> Tensor:
        msg = self.tp(self.lin1(f).index_select(0, col), sh, self.radial(radial))
        agg = msg.new_zeros(f.shape[0], msg.shape[1]).index_add_(0, row, msg)
        return self.sc(f) + self.lin2(agg / math.sqrt(self.num_neighbors))


def _gate(hidden: o3.Irreps) -> Gate:
    """Gated nonlinearity for ``hidden``: SiLU on 0e, tanh on 0o (odd activations keep the parity),
    sigmoid gates (0e) on every l > 0 irrep (Weiler et al. 2018)."""
    scalars = o3.Irreps([(m, ir) for m, ir in hidden if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in hidden if ir.l > 0])
    acts = [F.silu if ir.p == 1 else torch.tanh for _, ir in scalars]
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    return Gate(scalars, acts, gates, [torch.sigmoid] * len(gates), gated)


class E3Denoiser(nn.Module):
    """SE(3)-equivariant, reflection-sensitive denoiser: ``net(x: State, t: Tensor[B]) -> State``.

    Input fields: ``"pos" [N, 3]`` (flat, batch index ``x.batch["pos"]``) and, if ``h_dim > 0``,
    ``"h" [N, h_dim]`` (same batch index). Node scalars ``[h, t * time_scale]`` are embedded into
    ``hidden_irreps``; ``layers`` convolutions with gates follow; a linear read-out gives
    ``"pos" [N, 3]`` (``1o + 1e`` vectors, projected to zero centre of mass per molecule) and
    ``"h" [N, h_dim]`` (``0e + 0o`` scalars). Equivariant to rotations, translations (the output
    depends on differences only) and permutations of atoms; mirror images give outputs that are
    *not* mirror images of each other (needs ``layers >= 2`` for 1e and ``>= 3`` for 0o paths).

    Args:
        hidden_irreps: e3nn irreps of the node features, with odd-parity parts (``0o`` or ``1e``).
        layers: convolution + gate layers.
        lmax: largest degree of the edge spherical harmonics (1..3).
        h_dim: per-atom feature size (0: positions only, with a constant input feature).
        time_conditioning, time_scale: append ``t * time_scale`` to the input scalars.
        radial_basis, radial_hidden: Gaussian basis size on ``[0, r_max]`` and radial MLP width.
        r_max: range of the radial basis (in the units of ``pos``).
        num_neighbors: aggregated messages are divided by ``sqrt(num_neighbors)`` (QM9: ~17).

    dtype: e3nn computes its Clebsch-Gordan constants in the default dtype when the network is
    built. For float64 work build it with float64 as the default dtype
    (``torch.set_default_dtype``); ``.double()`` on a float32-built network keeps float32-rounded
    constants, which leaves equivariance errors of about 1e-9.
    """

    def __init__(
        self,
        *,
        hidden_irreps: str = "64x0e + 16x0o + 16x1o + 16x1e",
        layers: int = 4,
        lmax: int = 2,
        h_dim: int = 5,
        time_conditioning: bool = True,
        time_scale: float = 1.0,
        radial_basis: int = 16,
        radial_hidden: int = 64,
        r_max: float = 10.0,
        num_neighbors: float = 17.0,
    ) -> None:
        super().__init__()
        try:
            hidden = o3.Irreps(hidden_irreps).simplify()
        except (ValueError, AssertionError) as err:
            raise ValueError(f"E3Denoiser: cannot parse hidden_irreps {hidden_irreps!r}: {err}") from None
        for need, what in (("0e", "scalars"), ("1o", "vectors, from which positions are read out")):
            if o3.Irrep(need) not in hidden:
                raise ValueError(f"E3Denoiser: hidden_irreps {hidden_irreps!r} needs {need} ({what})")
        if not any(ir in (o3.Irrep("0o"), o3.Irrep("1e")) for _, ir in hidden):
            raise ValueError(
                f"E3Denoiser: hidden_irreps {hidden_irreps!r} has no parity-odd part (0o or 1e); such a "
                "network is reflection-equivariant and cannot tell enantiomers apart"
            )
        if not isinstance(lmax, int) or not 1 <= lmax <= 3:
            raise ValueError(f"E3Denoiser: lmax must be 1, 2 or 3, got {lmax!r}")
        for name, v in (("layers", layers), ("radial_basis", radial_basis), ("radial_hidden", radial_hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"E3Denoiser: {name} must be a positive integer, got {v!r}")
        if not isinstance(h_dim, int) or h_dim < 0:
            raise ValueError(f"E3Denoiser: h_dim must be a non-negative integer, got {h_dim!r}")
        if r_max <= 0 or num_neighbors <= 0:
            raise ValueError("E3Denoiser: r_max and num_neighbors must be positive")
        self._config = {
            "hidden_irreps": str(hidden_irreps), "layers": layers, "lmax": lmax, "h_dim": h_dim,
            "time_conditioning": bool(time_conditioning), "time_scale": float(time_scale),
            "radial_basis": radial_basis, "radial_hidden": radial_hidden, "r_max": float(r_max),
            "num_neighbors": float(num_neighbors),
        }
        self.h_dim, self.time_scale = h_dim, float(time_scale)
        self.time_conditioning = bool(time_conditioning)
        self.radial_basis, self.r_max = radial_basis, float(r_max)
        self._build(hidden, lmax, layers, radial_basis, radial_hidden, float(num_neighbors))

    def _build(self, hidden: o3.Irreps, lmax: int, layers: int, radial_basis: int, radial_hidden: int,
               num_neighbors: float) -> None:
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        in_nf = max(self.h_dim, 1) + int(self.time_conditioning)
        gates = [_gate(hidden) for _ in range(layers)]
        node = gates[0].irreps_out
        self.embedding = o3.Linear(o3.Irreps(f"{in_nf}x0e"), node)
        self.convs = nn.ModuleList()
        for gate in gates:
            self.convs.append(_Convolution(node, self.irreps_sh, gate.irreps_in, radial_basis, radial_hidden,
                                           num_neighbors))
            node = gate.irreps_out
        self.gates = nn.ModuleList(gates)
        self.irreps_out = o3.Irreps(f"{max(self.h_dim, 1)}x0e + {max(self.h_dim, 1)}x0o + 1x1o + 1x1e")
        self.readout = o3.Linear(node, self.irreps_out)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON), for checkpoints."""
        return dict(self._config)

    def forward(self, x: State, t: Tensor) -> State:
        """``x``: State with ``pos [N, 3]`` (and ``h [N, h_dim]``); ``t [B]`` -> eps-like State."""
        pos, feats, batch = node_inputs(x, t, owner="E3Denoiser", h_dim=self.h_dim,
                                        time_conditioning=self.time_conditioning,
                                        time_scale=self.time_scale, dtype=self.readout.weight.dtype)
        row, col = full_edges(batch, x.num_systems)
        vec = pos.index_select(0, row) - pos.index_select(0, col)  # [E, 3], from j = col to i = row
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        radial = soft_one_hot_linspace(vec.norm(dim=1), 0.0, self.r_max, self.radial_basis,
                                       basis="gaussian", cutoff=False) * math.sqrt(self.radial_basis)
        f = self.embedding(feats)
        for conv, gate in zip(self.convs, self.gates, strict=True):
            f = gate(conv(f, row, col, sh, radial))
        out = self.readout(f)
        k = max(self.h_dim, 1)
        # True + pseudo parts: rotations act alike on both, a reflection acts on them with opposite
        # signs, which is what makes the output chirality-aware.
        eps = _ZERO_COM.project(out[:, 2 * k: 2 * k + 3] + out[:, 2 * k + 3:], batch, x.num_systems)
        result = {"pos": eps}
        if self.h_dim:
            result["h"] = out[:, :k] + out[:, k: 2 * k]
        return x.replace(**result)
