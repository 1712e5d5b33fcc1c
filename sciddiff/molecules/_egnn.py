"""EDM's E(n)-equivariant denoiser (Hoogeboom et al. 2022, "Equivariant Diffusion for Molecule
Generation in 3D", App. B; EGNN of Satorras et al. 2021, Eqs. 3-6), written for speed.

Every molecule is a fully connected graph. Two layouts compute the same function:

- ``"sparse"`` (default): an edge list of the ``sum_b n_b (n_b - 1)`` real pairs, sorted by
  receiving atom. Gathers are one ``embedding_bag`` pass and sums one CSR product (custom
  autograd functions, so the backward is CSR products too); without autograd on CPU the edges
  run in cache-sized chunks with in-place activations;
- ``"dense"``: per-molecule padded blocks ``[B, Nmax, Nmax, F]`` with an edge mask and batched
  matrix products.

Both split the first (widest) layer of every edge MLP: ``W [h_i, h_j, e_ij] + b`` equals
``(W_s h_i + b) + W_t h_j + W_e e_ij``, so the ``[E, 2H + 2] x [2H + 2, H]`` product becomes two
``[N, H] x [H, H]`` products on nodes and a broadcast add on edges (EDM's code multiplies the
concatenation on every edge). Parameter names and shapes follow EDM's ``egnn_new.py``, so weights
map one to one (``benchmarks/_edm_reference.py`` holds the port; a test checks equal outputs).

Measured on 2 shared cores (``benchmarks/molecules.py``, 64 QM9-sized molecules, 9 x 256, 1
thread, CPU seconds): sparse 3.3 s per training step and 0.87 s per forward; dense 8.7 s and
1.9 s (it pays for padding: 46,656 padded vs 20,660 real edges); EDM's code 18.5 s and 4.1 s.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..core import State, ZeroCoM
from ._backbone import node_inputs

Impl = Literal["dense", "sparse"]
IMPLS: tuple[str, ...] = get_args(Impl)
#: Edges per chunk of the sparse layout's inference path (``[C, H]`` float32 blocks of 2 MB at H=256).
CHUNK_EDGES = 2048
#: ``body(pre, edges) -> (w, m)``: the rest of an edge MLP on the pre-activation of some edges.
_Body = Callable[[Tensor, slice], tuple[Tensor | None, Tensor]]
_ZERO_COM = ZeroCoM()


# ------------------------------------------------------------------------------------------------
# Graph layouts: the only code that knows how nodes and edges are stored.
def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the three ops used here are stable
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)


class _EdgeInput(torch.autograd.Function):
    """``out_e = a[row_e] + b[col_e] + W_e e_e`` in one pass over the edges: ``embedding_bag``
    (sum mode) over the table ``[a; b; W_e^T]`` with per-sample weights ``[1, 1, e_e]``. The
    backward sums edge gradients onto nodes with two CSR products (by row, by column)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, e: Tensor, w_e: Tensor, g: _Sparse) -> Tensor:
        ctx.g = g
        ctx.save_for_backward(e, w_e)
        table = torch.cat([a, b, w_e.t()])
        weights = torch.cat([e.new_ones(e.shape[0], 2), e], dim=1)
        return F.embedding_bag(g.edge_input_index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        g = ctx.g
        e, w_e = ctx.saved_tensors
        ga = gb = ge = gw = None
        ones = grad.new_ones(g.num_edges)
        if ctx.needs_input_grad[0]:
            ga = _csr(g.row_ptr, g.row_edges, ones, (g.num_nodes, g.num_edges)) @ grad
        if ctx.needs_input_grad[1]:
            gb = _csr(g.col_ptr, g.col_edges, ones, (g.num_nodes, g.num_edges)) @ grad
        if ctx.needs_input_grad[2]:
            ge = grad @ w_e
        if ctx.needs_input_grad[3]:
            gw = (e.t() @ grad).t()
        return ga, gb, ge, gw, None


class _WeightedSum(torch.autograd.Function):
    """``out_i = sum_{e: row_e = i} w_e m_e`` as a CSR product with values ``w``; the backward
    gives ``dm_e = w_e dout[row_e]`` (``embedding_bag``) and ``dw_e = <dout[row_e], m_e>``
    (``sampled_addmm``), never materialising ``[E, F]`` products."""

    @staticmethod
    def forward(ctx, w: Tensor, m: Tensor, g: _Sparse) -> Tensor:
        ctx.g = g
        ctx.save_for_backward(w, m)
        return _csr(g.row_ptr, g.row_edges, w, (g.num_nodes, g.num_edges)) @ m

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        g = ctx.g
        w, m = ctx.saved_tensors
        gm = gw = None
        if ctx.needs_input_grad[1]:
            gm = F.embedding_bag(g.row[:, None], grad, per_sample_weights=w[:, None], mode="sum")
        if ctx.needs_input_grad[0]:
            pattern = _csr(g.row_ptr, g.row_edges, w.new_zeros(g.num_edges), (g.num_nodes, g.num_edges))
            gw = torch.sparse.sampled_addmm(pattern, grad.contiguous(), m.t()).values()
        return gw, gm, None


class _Sparse:
    """Edge list of all ordered pairs ``i != j`` within each system, sorted by ``row``; nodes
    ``[N, F]``, edges ``[E, F]``. Gathers and sums use ``embedding_bag`` and CSR products: one
    pass over the edge tensor each, where ``index_select`` + add or ``mul`` + ``index_add_`` take
    two or three (the edge passes, not the matrix products, dominated the first version)."""

    def __init__(self, batch: Tensor, num_systems: int) -> None:
        self.row, self.col = full_edges(batch, num_systems)
        self.num_nodes, self.num_edges = batch.shape[0], self.row.shape[0]
        dev = batch.device
        n = self.num_nodes
        two_n = torch.full_like(self.row, 2 * n)
        self.edge_input_index = torch.stack([self.row, self.col + n, two_n, two_n + 1], dim=1)
        self.row_ptr = _offsets(self.row, self.num_nodes)
        self.row_edges = torch.arange(self.num_edges, device=dev)
        self.col_edges = torch.argsort(self.col, stable=True)
        self.col_ptr = _offsets(self.col, self.num_nodes)
        self._chunks: list[tuple[int, int, int, int]] | None = None

    def to_nodes(self, x: Tensor) -> Tensor:
        return x

    def from_nodes(self, x: Tensor) -> Tensor:
        return x

    def edge_input(self, a: Tensor, b: Tensor, e: Tensor, w_e: Tensor) -> Tensor:
        """``a_i + b_j + w_e e_ij`` on every edge ``(i, j)``: ``a, b [N, F]``, ``e [E, 2]``,
        ``w_e [F, 2]`` -> ``[E, F]``."""
        return _EdgeInput.apply(a, b, e, w_e, self)

    def diff(self, x: Tensor) -> Tensor:
        """``x_i - x_j`` on every edge: ``[N, 3] -> [E, 3]``."""
        return x.index_select(0, self.row) - x.index_select(0, self.col)

    def mask(self, w: Tensor) -> Tensor:
        return w  # no padding, no self-edges

    def aggregate(self, w: Tensor | None, m: Tensor) -> Tensor:
        """``sum_j w_ij m_ij`` per node: ``w [E, 1]`` (None: 1), ``m [E, F]`` -> ``[N, F]``."""
        if w is None:
            w = m.new_ones(self.num_edges)
        return _WeightedSum.apply(w.reshape(-1), m, self)

    def edge_pipeline(self, a: Tensor, b: Tensor, e: Tensor, w_e: Tensor, body: _Body) -> Tensor:
        """``sum_j w_ij m_ij`` with ``(w, m) = body(a_i + b_j + w_e e_ij, edges)``: ``[N, F]``.

        Without autograd on CPU the edges run in chunks of whole rows (about ``CHUNK_EDGES``), so
        every ``[C, H]`` intermediate stays in cache and its memory is reused: sampling then costs
        little beyond the matrix products. With autograd (training) the edges run at once.
        """
        if torch.is_grad_enabled() or a.device.type != "cpu" or self.num_edges == 0:
            w, m = body(self.edge_input(a, b, e, w_e), slice(None))
            return self.aggregate(w, m)
        table = torch.cat([a, b, w_e.t()])
        out = None
        for r0, r1, e0, e1 in self.chunks():
            weights = torch.cat([e.new_ones(e1 - e0, 2), e[e0:e1]], dim=1)
            pre = F.embedding_bag(self.edge_input_index[e0:e1], table, per_sample_weights=weights, mode="sum")
            w, m = body(pre, slice(e0, e1))
            w = m.new_ones(e1 - e0) if w is None else w.reshape(-1)
            part = _csr(self.row_ptr[r0:r1 + 1] - e0, self.row_edges[: e1 - e0], w, (r1 - r0, e1 - e0)) @ m
            if out is None:
                out = part.new_zeros(self.num_nodes, part.shape[1])
            out[r0:r1] = part
        return out

    def chunks(self) -> list[tuple[int, int, int, int]]:
        """``(row0, row1, edge0, edge1)`` ranges of whole rows with about ``CHUNK_EDGES`` edges."""
        if self._chunks is None:
            ptr = self.row_ptr.tolist()
            self._chunks, r0 = [], 0
            while r0 < self.num_nodes:
                r1 = bisect.bisect_right(ptr, ptr[r0] + CHUNK_EDGES, lo=r0 + 1) - 1
                r1 = min(max(r1, r0 + 1), self.num_nodes)
                if ptr[r1] > ptr[r0]:
                    self._chunks.append((r0, r1, ptr[r0], ptr[r1]))
                r0 = r1
        return self._chunks

    def mask_nodes(self, h: Tensor) -> Tensor:
        return h


def _offsets(index: Tensor, n: int) -> Tensor:
    """CSR row pointer ``[n + 1]`` of a sorted-or-not index ``[E]`` with values in ``[0, n)``."""
    counts = torch.bincount(index, minlength=n)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


class _Dense:
    """Padded blocks: nodes ``[B, Nmax, F]``, edges ``[B, Nmax, Nmax, F]``, edge mask excluding
    padding and the diagonal."""

    def __init__(self, batch: Tensor, num_systems: int, dtype: torch.dtype) -> None:
        counts = torch.bincount(batch, minlength=num_systems)
        order = torch.argsort(batch, stable=True)
        ptr = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(batch)
        slot[order] = torch.arange(batch.shape[0], device=batch.device) - ptr[batch[order]]
        self.batch, self.slot = batch, slot
        self.num_systems = num_systems
        self.nmax = int(counts.max()) if batch.numel() else 0
        node = torch.arange(self.nmax, device=batch.device)[None, :] < counts[:, None]  # [B, Nmax]
        eye = torch.eye(self.nmax, dtype=torch.bool, device=batch.device)
        edge = node[:, :, None] & node[:, None, :] & ~eye
        self.node_mask = node.to(dtype)[..., None]  # [B, Nmax, 1]
        self.edge_mask = edge.to(dtype)[..., None]  # [B, Nmax, Nmax, 1]

    def to_nodes(self, x: Tensor) -> Tensor:
        """``[N, F] -> [B, Nmax, F]`` (zeros in the padding)."""
        out = x.new_zeros(self.num_systems, self.nmax, x.shape[-1])
        return out.index_put((self.batch, self.slot), x)

    def from_nodes(self, x: Tensor) -> Tensor:
        return x[self.batch, self.slot]

    def edge_input(self, a: Tensor, b: Tensor, e: Tensor, w_e: Tensor) -> Tensor:
        """``a_i + b_j + w_e e_ij``: ``a, b [B, N, F]``, ``e [B, N, N, 2]`` -> ``[B, N, N, F]``."""
        pair = (a[:, :, None, :] + b[:, None, :, :]).reshape(-1, a.shape[-1])
        return torch.addmm(pair, e.reshape(-1, e.shape[-1]), w_e.t()).reshape(*e.shape[:-1], -1)

    def diff(self, x: Tensor) -> Tensor:
        return x[:, :, None, :] - x[:, None, :, :]

    def mask(self, w: Tensor) -> Tensor:
        return w * self.edge_mask

    def aggregate(self, w: Tensor | None, m: Tensor) -> Tensor:
        """``sum_j w_ij m_ij``: ``w [B, N, N, 1]``, ``m [B, N, N, F]`` -> ``[B, N, F]``; one batched
        ``[1, N] x [N, F]`` product per node (a product tensor and a sum took 2.5x longer)."""
        w = self.edge_mask if w is None else w
        return torch.matmul(w.transpose(-1, -2), m).squeeze(-2)

    def mask_nodes(self, h: Tensor) -> Tensor:
        return h * self.node_mask

    def edge_pipeline(self, a: Tensor, b: Tensor, e: Tensor, w_e: Tensor, body: _Body) -> Tensor:
        """``sum_j w_ij m_ij`` with ``(w, m) = body(a_i + b_j + w_e e_ij, all edges)``: ``[B, N, F]``."""
        w, m = body(self.edge_input(a, b, e, w_e), slice(None))
        return self.aggregate(w, m)


def full_edges(batch: Tensor, num_systems: int) -> tuple[Tensor, Tensor]:
    """All ordered pairs ``(i, j)``, ``i != j``, of elements in the same system.

    Args:
        batch: ``[N]`` system index of each element (any order).
    Returns:
        ``(row, col)``, each ``[E]`` with ``E = sum_b n_b (n_b - 1)``, sorted by ``row``.
    """
    n = batch.shape[0]
    counts = torch.bincount(batch, minlength=num_systems)
    members = torch.argsort(batch, stable=True)  # elements of system b: members[ptr[b]:ptr[b] + n_b]
    ptr = torch.cumsum(counts, 0) - counts
    deg = counts[batch]  # partners of each element, itself included
    total = int(deg.sum())
    row = torch.repeat_interleave(torch.arange(n, device=batch.device), deg, output_size=total)
    start = torch.cumsum(deg, 0) - deg
    col = members[ptr[batch[row]] + torch.arange(total, device=batch.device) - start[row]]
    keep = row != col
    return row[keep], col[keep]


# ------------------------------------------------------------------------------------------------
def _messages(lin: nn.Linear, h: Tensor, e: Tensor, g: _Sparse | _Dense, body: _Body) -> Tensor:
    """``sum_j w_ij m_ij`` where ``(w, m) = body(pre, edges)`` and ``pre`` is the first layer of an
    EDM edge MLP on ``[h_i, h_j, e_ij]``, factored per node: ``(W_s h_i + b) + W_t h_j + W_e e_ij``.

    ``lin``: ``Linear(2H + 2, H)``; ``h``: nodes ``[.., H]``; ``e = [d2, d0]``: edges ``[.., 2]``.
    """
    H = h.shape[-1]
    w = lin.weight
    return g.edge_pipeline(F.linear(h, w[:, :H], lin.bias), F.linear(h, w[:, H:2 * H]), e, w[:, 2 * H:], body)


def _mlp_tail(pre: Tensor, lin: nn.Module) -> Tensor:
    """``silu(lin(silu(pre)))``, in place where autograd is off (no new ``[E, H]`` buffers)."""
    inplace = not torch.is_grad_enabled()
    return F.silu(lin(F.silu(pre, inplace=inplace)), inplace=inplace)


class GCL(nn.Module):
    """Invariant message passing (Satorras et al. 2021, Eqs. 3, 5, 6; EDM's ``GCL``):
    ``m_ij = phi_e(h_i, h_j, d2_ij, d0_ij)``, gated by ``sigmoid(phi_att(m_ij))``,
    ``h_i += phi_h(h_i, sum_j m_ij / normalization_factor)``."""

    def __init__(self, hidden: int, attention: bool, normalization_factor: float) -> None:
        super().__init__()
        self.normalization_factor = normalization_factor
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + 2, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden), nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.att_mlp = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None

    def forward(self, h: Tensor, e: Tensor, g: _Sparse | _Dense) -> Tensor:
        """``h``: nodes ``[.., H]``; ``e = [d2, d0]``: edges ``[.., 2]``; returns new ``h``."""

        def body(pre: Tensor, edges: slice) -> tuple[Tensor | None, Tensor]:
            m = _mlp_tail(pre, self.edge_mlp[2])
            return (g.mask(self.att_mlp(m)) if self.att_mlp is not None else None), m

        agg = _messages(self.edge_mlp[0], h, e, g, body) / self.normalization_factor
        return h + self.node_mlp(torch.cat([h, agg], dim=-1))


class EquivariantUpdate(nn.Module):
    """``x_i += sum_j (x_i - x_j) / (|x_i - x_j| + c) * tanh(phi_x(h_i, h_j, d2, d0)) * range``
    (Satorras et al. 2021, Eq. 4, with EDM's normalised differences and tanh range)."""

    def __init__(self, hidden: int, tanh: bool, coords_range: float, normalization_factor: float) -> None:
        super().__init__()
        self.tanh, self.coords_range = tanh, coords_range
        self.normalization_factor = normalization_factor
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)  # EDM: start near the identity map
        self.coord_mlp = nn.Sequential(nn.Linear(2 * hidden + 2, hidden), nn.SiLU(),
                                       nn.Linear(hidden, hidden), nn.SiLU(), last)

    def forward(self, h: Tensor, x: Tensor, unit: Tensor, e: Tensor, g: _Sparse | _Dense) -> Tensor:
        """``x``: nodes ``[.., 3]``; ``unit``: ``(x_i - x_j) / (d_ij + c)`` on edges ``[.., 3]``."""

        def body(pre: Tensor, edges: slice) -> tuple[Tensor, Tensor]:
            phi = self.coord_mlp[4](_mlp_tail(pre, self.coord_mlp[2]))  # [.., 1]
            if self.tanh:
                phi = torch.tanh(phi) * self.coords_range
            return g.mask(phi), unit[edges]

        return x + _messages(self.coord_mlp[0], h, e, g, body) / self.normalization_factor


class EquivariantBlock(nn.Module):
    """``inv_sublayers`` GCLs then one coordinate update, all seeing ``[d2_ij, d0_ij]`` (current and
    input squared distances; EDM's ``sin_embedding=False``)."""

    def __init__(self, hidden: int, inv_sublayers: int, attention: bool, tanh: bool, coords_range: float,
                 norm_constant: float, normalization_factor: float) -> None:
        super().__init__()
        self.norm_constant = norm_constant
        self.gcl = nn.ModuleList(GCL(hidden, attention, normalization_factor) for _ in range(inv_sublayers))
        self.gcl_equiv = EquivariantUpdate(hidden, tanh, coords_range, normalization_factor)

    def forward(self, h: Tensor, x: Tensor, d0: Tensor, g: _Sparse | _Dense) -> tuple[Tensor, Tensor]:
        diff = g.diff(x)
        d2 = diff.square().sum(-1, keepdim=True)
        unit = diff / (torch.sqrt(d2 + 1e-8) + self.norm_constant)
        e = torch.cat([d2, d0], dim=-1)
        for layer in self.gcl:
            h = layer(h, e, g)
        x = self.gcl_equiv(h, x, unit, e, g)
        return g.mask_nodes(h), x


class EGNNDenoiser(nn.Module):
    """EDM's EGNN denoiser: ``net(x: State, t: Tensor[B]) -> State`` for molecules.

    Input fields: ``"pos" [N, 3]`` (flat, batch index ``x.batch["pos"]``) and, if ``h_dim > 0``,
    ``"h" [N, h_dim]`` (same batch index). Node features ``[h, t * time_scale]`` are embedded,
    ``layers`` equivariant blocks update ``(h, x)``, and the output is ``"pos"``: ``x_final - x``
    projected to zero centre of mass per molecule (EDM's ``vel``), and ``"h"``: the decoded node
    features ``[N, h_dim]``. Equivariant to rotations, reflections and translations of ``pos``
    (the output is a difference, so translation-invariant) and to permutations of atoms.

    Args:
        hidden: node feature width H (EDM QM9: 256).
        layers: equivariant blocks (EDM QM9: 9).
        inv_sublayers: GCLs per block (EDM QM9: 1).
        h_dim: per-atom feature size (5: one-hot H, C, N, O, F); 0 for positions only (EDM then
            uses a constant feature).
        time_conditioning: append ``t * time_scale`` to the node features (EDM: t / T in [0, 1];
            use ``time_scale = 1 / (T - 1)`` with a discrete-time ``VP(timesteps=T)``).
        attention: sigmoid gates on messages.
        tanh, coords_range: coordinate steps ``tanh(phi) * coords_range`` (EDM: True, 15).
        norm_constant: ``c`` in ``(x_i - x_j) / (|x_i - x_j| + c)`` (EDM QM9: 1).
        normalization_factor: sums over neighbours are divided by it (EDM QM9: 1, aggregation sum).
        impl: ``"sparse"`` (edge list; faster on CPU) or ``"dense"`` (padded blocks); same
            function.
    """

    def __init__(
        self,
        *,
        hidden: int = 256,
        layers: int = 9,
        inv_sublayers: int = 1,
        h_dim: int = 5,
        time_conditioning: bool = True,
        time_scale: float = 1.0,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        impl: Impl = "sparse",
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"EGNNDenoiser: unknown impl {impl!r}; expected one of {IMPLS}")
        for name, v in (("hidden", hidden), ("layers", layers), ("inv_sublayers", inv_sublayers)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"EGNNDenoiser: {name} must be a positive integer, got {v!r}")
        if not isinstance(h_dim, int) or h_dim < 0:
            raise ValueError(f"EGNNDenoiser: h_dim must be a non-negative integer, got {h_dim!r}")
        if coords_range <= 0 or normalization_factor <= 0 or norm_constant < 0:
            raise ValueError(
                "EGNNDenoiser: need coords_range > 0, normalization_factor > 0 and norm_constant >= 0"
            )
        self._config = {
            "hidden": hidden, "layers": layers, "inv_sublayers": inv_sublayers, "h_dim": h_dim,
            "time_conditioning": bool(time_conditioning), "time_scale": float(time_scale),
            "attention": bool(attention), "tanh": bool(tanh), "coords_range": float(coords_range),
            "norm_constant": float(norm_constant), "normalization_factor": float(normalization_factor),
            "impl": impl,
        }
        self.h_dim, self.impl = h_dim, impl
        self.time_conditioning, self.time_scale = bool(time_conditioning), float(time_scale)
        in_nf = max(h_dim, 1) + int(self.time_conditioning)  # EDM: constant ones when h_dim == 0
        self.embedding = nn.Linear(in_nf, hidden)
        self.embedding_out = nn.Linear(hidden, in_nf)
        self.e_blocks = nn.ModuleList(
            EquivariantBlock(hidden, inv_sublayers, attention, tanh, float(coords_range),
                             float(norm_constant), float(normalization_factor))
            for _ in range(layers)
        )

    @property
    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON), for checkpoints."""
        return dict(self._config)

    def forward(self, x: State, t: Tensor) -> State:
        """``x``: State with ``pos [N, 3]`` (and ``h [N, h_dim]``); ``t [B]`` -> eps-like State."""
        pos, feats, batch = node_inputs(x, t, owner="EGNNDenoiser", h_dim=self.h_dim,
                                        time_conditioning=self.time_conditioning,
                                        time_scale=self.time_scale, dtype=self.embedding.weight.dtype)
        B = x.num_systems
        g = _Sparse(batch, B) if self.impl == "sparse" else _Dense(batch, B, pos.dtype)
        x0 = g.to_nodes(pos)
        d0 = g.diff(x0).square().sum(-1, keepdim=True)
        h, xx = self.embedding(g.to_nodes(feats)), x0
        for block in self.e_blocks:
            h, xx = block(h, xx, d0, g)
        eps = _ZERO_COM.project(g.from_nodes(xx - x0), batch, B)
        out = {"pos": eps}
        if self.h_dim:
            out["h"] = g.from_nodes(self.embedding_out(h))[:, : self.h_dim]
        return x.replace(**out)
