"""A faithful re-write of EDM's published EGNN denoiser, as the speed baseline.

EDM (Hoogeboom, Satorras, Vignac & Welling 2022; github ehoogeboom/e3_diffusion_for_molecules)
runs ``EGNN_dynamics_QM9`` (``egnn/models.py``) around ``EGNN`` (``egnn/egnn_new.py``). This
module re-states that code's structure from its published description, not copied: molecules
padded to ``[B, Nmax, 3 + h]`` with a node mask, a fully connected edge list over ``B * Nmax^2``
pairs (self-pairs and padding included, removed by an ``edge_mask [B * Nmax^2, 1]``) built by
Python loops and cached per ``(Nmax, B)``, messages on ``cat([h_i, h_j, d2_ij, d0_ij])`` through
full ``Linear(2H + 2, H)`` layers on every edge, ``unsorted_segment_sum`` (``scatter_add_``)
aggregation, masks multiplied after each layer, and ``remove_mean_with_mask`` on the output.

Parameter names match EDM's, and ``port_weights`` maps an ``EGNNDenoiser`` state dict onto them,
so the two compute the same function (tests check it).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from sciddiff.core import State
from sciddiff.molecules._egnn import EGNNDenoiser


def unsorted_segment_sum(data: Tensor, segment_ids: Tensor, num_segments: int, normalization_factor: float,
                         aggregation_method: str) -> Tensor:
    """Sum (divided by ``normalization_factor``) or mean of ``data [E, F]`` per segment ``[E]``."""
    result = data.new_full((num_segments, data.size(1)), 0)
    ids = segment_ids.unsqueeze(-1).expand(-1, data.size(1))
    result.scatter_add_(0, ids, data)
    if aggregation_method == "sum":
        result = result / normalization_factor
    if aggregation_method == "mean":
        norm = data.new_zeros(result.shape)
        norm.scatter_add_(0, ids, data.new_ones(data.shape))
        norm[norm == 0] = 1
        result = result / norm
    return result


def coord2diff(x: Tensor, edge_index: list[Tensor], norm_constant: float = 1.0) -> tuple[Tensor, Tensor]:
    """Squared distances ``[E, 1]`` and normalised differences ``(x_i - x_j) / (d_ij + c)`` ``[E, 3]``."""
    row, col = edge_index
    coord_diff = x[row] - x[col]
    radial = torch.sum(coord_diff**2, 1).unsqueeze(1)
    norm = torch.sqrt(radial + 1e-8)
    return radial, coord_diff / (norm + norm_constant)


class GCL(nn.Module):
    def __init__(self, input_nf: int, output_nf: int, hidden_nf: int, normalization_factor: float,
                 aggregation_method: str, edges_in_d: int = 0, act_fn: nn.Module | None = None,
                 attention: bool = False) -> None:
        super().__init__()
        act_fn = act_fn or nn.SiLU()
        self.normalization_factor, self.aggregation_method = normalization_factor, aggregation_method
        self.attention = attention
        self.edge_mlp = nn.Sequential(nn.Linear(input_nf * 2 + edges_in_d, hidden_nf), act_fn,
                                      nn.Linear(hidden_nf, hidden_nf), act_fn)
        self.node_mlp = nn.Sequential(nn.Linear(hidden_nf + input_nf, hidden_nf), act_fn,
                                      nn.Linear(hidden_nf, output_nf))
        if attention:
            self.att_mlp = nn.Sequential(nn.Linear(hidden_nf, 1), nn.Sigmoid())

    def edge_model(self, source: Tensor, target: Tensor, edge_attr: Tensor, edge_mask: Tensor | None):
        out = torch.cat([source, target, edge_attr], dim=1)
        mij = self.edge_mlp(out)
        out = mij * self.att_mlp(mij) if self.attention else mij
        if edge_mask is not None:
            out = out * edge_mask
        return out, mij

    def node_model(self, x: Tensor, edge_index: list[Tensor], edge_attr: Tensor):
        row, _ = edge_index
        agg = unsorted_segment_sum(edge_attr, row, x.size(0), self.normalization_factor,
                                   self.aggregation_method)
        agg = torch.cat([x, agg], dim=1)
        return x + self.node_mlp(agg), agg

    def forward(self, h, edge_index, edge_attr=None, node_mask=None, edge_mask=None):
        row, col = edge_index
        edge_feat, mij = self.edge_model(h[row], h[col], edge_attr, edge_mask)
        h, _ = self.node_model(h, edge_index, edge_feat)
        if node_mask is not None:
            h = h * node_mask
        return h, mij


class EquivariantUpdate(nn.Module):
    def __init__(self, hidden_nf: int, normalization_factor: float, aggregation_method: str,
                 edges_in_d: int = 1, tanh: bool = False, coords_range: float = 10.0) -> None:
        super().__init__()
        self.tanh, self.coords_range = tanh, coords_range
        self.normalization_factor, self.aggregation_method = normalization_factor, aggregation_method
        layer = nn.Linear(hidden_nf, 1, bias=False)
        torch.nn.init.xavier_uniform_(layer.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(nn.Linear(hidden_nf * 2 + edges_in_d, hidden_nf), nn.SiLU(),
                                       nn.Linear(hidden_nf, hidden_nf), nn.SiLU(), layer)

    def coord_model(self, h, coord, edge_index, coord_diff, edge_attr, edge_mask):
        row, col = edge_index
        input_tensor = torch.cat([h[row], h[col], edge_attr], dim=1)
        if self.tanh:
            trans = coord_diff * torch.tanh(self.coord_mlp(input_tensor)) * self.coords_range
        else:
            trans = coord_diff * self.coord_mlp(input_tensor)
        if edge_mask is not None:
            trans = trans * edge_mask
        agg = unsorted_segment_sum(trans, row, coord.size(0), self.normalization_factor,
                                   self.aggregation_method)
        return coord + agg

    def forward(self, h, coord, edge_index, coord_diff, edge_attr=None, node_mask=None, edge_mask=None):
        coord = self.coord_model(h, coord, edge_index, coord_diff, edge_attr, edge_mask)
        if node_mask is not None:
            coord = coord * node_mask
        return coord


class EquivariantBlock(nn.Module):
    def __init__(self, hidden_nf: int, edge_feat_nf: int = 2, n_layers: int = 2, attention: bool = True,
                 tanh: bool = False, coords_range: float = 15.0, norm_constant: float = 1.0,
                 normalization_factor: float = 100.0, aggregation_method: str = "sum") -> None:
        super().__init__()
        self.n_layers, self.norm_constant = n_layers, norm_constant
        for i in range(n_layers):
            self.add_module(f"gcl_{i}", GCL(hidden_nf, hidden_nf, hidden_nf, normalization_factor,
                                            aggregation_method, edges_in_d=edge_feat_nf, attention=attention))
        self.add_module("gcl_equiv", EquivariantUpdate(hidden_nf, normalization_factor, aggregation_method,
                                                       edges_in_d=edge_feat_nf, tanh=tanh,
                                                       coords_range=coords_range))

    def forward(self, h, x, edge_index, node_mask=None, edge_mask=None, edge_attr=None):
        distances, coord_diff = coord2diff(x, edge_index, self.norm_constant)
        edge_attr = torch.cat([distances, edge_attr], dim=1)
        for i in range(self.n_layers):
            h, _ = self._modules[f"gcl_{i}"](h, edge_index, edge_attr=edge_attr, node_mask=node_mask,
                                             edge_mask=edge_mask)
        x = self._modules["gcl_equiv"](h, x, edge_index, coord_diff, edge_attr, node_mask, edge_mask)
        if node_mask is not None:
            h = h * node_mask
        return h, x


class EGNN(nn.Module):
    def __init__(self, in_node_nf: int, hidden_nf: int, n_layers: int = 3, attention: bool = False,
                 out_node_nf: int | None = None, tanh: bool = False, coords_range: float = 15.0,
                 norm_constant: float = 1.0, inv_sublayers: int = 2, normalization_factor: float = 100.0,
                 aggregation_method: str = "sum") -> None:
        super().__init__()
        out_node_nf = in_node_nf if out_node_nf is None else out_node_nf
        self.n_layers = n_layers
        self.embedding = nn.Linear(in_node_nf, hidden_nf)
        self.embedding_out = nn.Linear(hidden_nf, out_node_nf)
        for i in range(n_layers):
            self.add_module(f"e_block_{i}", EquivariantBlock(
                hidden_nf, edge_feat_nf=2, n_layers=inv_sublayers, attention=attention, tanh=tanh,
                coords_range=coords_range, norm_constant=norm_constant,
                normalization_factor=normalization_factor, aggregation_method=aggregation_method))

    def forward(self, h, x, edge_index, node_mask=None, edge_mask=None):
        distances, _ = coord2diff(x, edge_index)
        h = self.embedding(h)
        for i in range(self.n_layers):
            h, x = self._modules[f"e_block_{i}"](h, x, edge_index, node_mask=node_mask, edge_mask=edge_mask,
                                                 edge_attr=distances)
        h = self.embedding_out(h)
        if node_mask is not None:
            h = h * node_mask
        return h, x


def remove_mean_with_mask(x: Tensor, node_mask: Tensor) -> Tensor:
    n = node_mask.sum(1, keepdims=True)
    mean = torch.sum(x, dim=1, keepdim=True) / n
    return x - mean * node_mask


class EGNNDynamicsQM9(nn.Module):
    """EDM's ``EGNN_dynamics_QM9`` (mode ``egnn_dynamics``, no context): ``forward(t [B, 1],
    xh [B, Nmax, 3 + h], node_mask [B, Nmax, 1], edge_mask [B * Nmax^2, 1]) -> [B, Nmax, 3 + h]``."""

    def __init__(self, in_node_nf: int, hidden_nf: int = 256, n_layers: int = 9, attention: bool = True,
                 condition_time: bool = True, tanh: bool = True, norm_constant: float = 1.0,
                 inv_sublayers: int = 1, normalization_factor: float = 1.0, aggregation_method: str = "sum",
                 coords_range: float = 15.0) -> None:
        super().__init__()
        self.egnn = EGNN(in_node_nf=in_node_nf, hidden_nf=hidden_nf, n_layers=n_layers, attention=attention,
                         tanh=tanh, coords_range=coords_range, norm_constant=norm_constant,
                         inv_sublayers=inv_sublayers, normalization_factor=normalization_factor,
                         aggregation_method=aggregation_method)
        self.in_node_nf, self.n_dims, self.condition_time = in_node_nf, 3, condition_time
        self._edges_dict: dict[int, dict[int, list[Tensor]]] = {}

    def get_adj_matrix(self, n_nodes: int, batch_size: int, device) -> list[Tensor]:
        by_size = self._edges_dict.setdefault(n_nodes, {})
        if batch_size not in by_size:
            rows, cols = [], []
            for batch_idx in range(batch_size):
                for i in range(n_nodes):
                    for j in range(n_nodes):
                        rows.append(i + batch_idx * n_nodes)
                        cols.append(j + batch_idx * n_nodes)
            by_size[batch_size] = [torch.LongTensor(rows).to(device), torch.LongTensor(cols).to(device)]
        return by_size[batch_size]

    def forward(self, t: Tensor, xh: Tensor, node_mask: Tensor, edge_mask: Tensor) -> Tensor:
        bs, n_nodes, dims = xh.shape
        edges = self.get_adj_matrix(n_nodes, bs, xh.device)
        node_mask = node_mask.view(bs * n_nodes, 1)
        edge_mask = edge_mask.view(bs * n_nodes * n_nodes, 1)
        xh = xh.view(bs * n_nodes, -1).clone() * node_mask
        x = xh[:, 0:self.n_dims].clone()
        h = xh[:, self.n_dims:].clone() if dims > self.n_dims else torch.ones(bs * n_nodes, 1).to(xh)
        if self.condition_time:
            h_time = t.view(bs, 1).repeat(1, n_nodes).view(bs * n_nodes, 1)
            h = torch.cat([h, h_time], dim=1)
        h_final, x_final = self.egnn(h, x, edges, node_mask=node_mask, edge_mask=edge_mask)
        vel = (x_final - x) * node_mask
        if self.condition_time:
            h_final = h_final[:, :-1]
        vel = remove_mean_with_mask(vel.view(bs, n_nodes, -1), node_mask.view(bs, n_nodes, 1))
        if dims == self.n_dims:
            return vel
        return torch.cat([vel, h_final.view(bs, n_nodes, -1)], dim=2)


# ------------------------------------------------------------------------------------------------
def to_edm_batch(state: State, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's padded batch from a molecule State: ``(t [B, 1], xh [B, Nmax, 3 + h],
    node_mask [B, Nmax, 1], edge_mask [B * Nmax^2, 1])`` (EDM's collate: atoms in slot order)."""
    batch, B = state.batch["pos"], state.num_systems
    counts = torch.bincount(batch, minlength=B)
    nmax = int(counts.max())
    order = torch.argsort(batch, stable=True)
    slot = torch.empty_like(batch)
    slot[order] = torch.arange(batch.shape[0]) - (torch.cumsum(counts, 0) - counts)[batch[order]]
    feats = torch.cat([state["pos"], state["h"]], dim=1) if "h" in state.keys() else state["pos"]
    xh = feats.new_zeros(B, nmax, feats.shape[1])
    xh[batch, slot] = feats
    node = (torch.arange(nmax)[None, :] < counts[:, None]).to(feats.dtype)
    edge = node[:, :, None] * node[:, None, :] * (1 - torch.eye(nmax, dtype=feats.dtype))
    return t.reshape(B, 1).to(feats.dtype), xh, node[..., None], edge.reshape(B * nmax * nmax, 1)


def from_denoiser(net: EGNNDenoiser) -> EGNNDynamicsQM9:
    """The EDM network with ``net``'s hyperparameters and weights."""
    c = net.config
    if not c["time_conditioning"] or c["time_scale"] != 1.0:
        raise ValueError("from_denoiser: EDM's network takes t itself (time_conditioning, time_scale 1)")
    ref = EGNNDynamicsQM9(max(c["h_dim"], 1) + 1, hidden_nf=c["hidden"], n_layers=c["layers"],
                          attention=c["attention"], tanh=c["tanh"], norm_constant=c["norm_constant"],
                          inv_sublayers=c["inv_sublayers"], normalization_factor=c["normalization_factor"],
                          coords_range=c["coords_range"])
    ref = ref.to(net.embedding.weight.dtype)
    ref.load_state_dict(port_weights(net.state_dict()))
    return ref


def port_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``EGNNDenoiser`` parameter names -> EDM's (``e_blocks.3.gcl.0.*`` -> ``egnn.e_block_3.gcl_0.*``)."""
    out = {}
    for k, v in state_dict.items():
        k2 = re.sub(r"^e_blocks\.(\d+)\.gcl\.(\d+)\.", r"e_block_\1.gcl_\2.", k)
        k2 = re.sub(r"^e_blocks\.(\d+)\.gcl_equiv\.", r"e_block_\1.gcl_equiv.", k2)
        out["egnn." + k2] = v
    return out
