"""A compact DDPM++-style UNet for gridded fields (the backbone of the climate downscaler).

Architecture (Ho et al. 2020, "DDPM", Appendix B; Song et al. 2021, "Score-based generative
modelling through SDEs", DDPM++ configuration; Karras et al. 2022, "EDM", Table 7 for the
``base``/``mults``/``blocks`` configuration style):

- residual blocks ``GroupNorm -> SiLU -> Conv3x3 -> FiLM(emb) -> GroupNorm -> SiLU -> Dropout ->
  Conv3x3`` plus a (1x1) skip, summed and scaled by ``1/sqrt(2)`` (DDPM++'s ``skip_scale``);
- the noise embedding (sinusoidal positional features of the scalar noise input, Vaswani et al.
  2017, then a 2-layer MLP) modulates each block by a per-channel scale and shift (FiLM; Perez et
  al. 2018; "adaptive group norm" in Dhariwal & Nichol 2021);
- optional self-attention blocks at chosen resolution levels;
- 2x2 average-pool downsampling and nearest-neighbour upsampling, each followed by a 3x3 conv.

Odd sizes: the input is padded so that ``H`` and ``W`` are multiples of ``2**(levels - 1)`` and
the output is cropped back. Periodic longitude (``periodic_lon``): every 3x3 convolution pads the
last (longitude) axis circularly and the latitude axis with zeros, so for ``W`` divisible by
``2**(levels - 1)`` the network commutes exactly with longitude rolls by multiples of
``2**(levels - 1)`` (pooling by 2 breaks equivariance to odd shifts, as any strided network does);
where ``W`` is not divisible the longitude padding continues the field periodically, which keeps
the seam smooth but not exactly equivariant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _groups(channels: int) -> int:
    """The largest group count <= 32 that divides ``channels`` (GroupNorm; Wu & He 2018)."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class _Conv3x3(nn.Module):
    """3x3 convolution with zero padding in latitude and zero or circular padding in longitude."""

    def __init__(self, cin: int, cout: int, periodic_lon: bool, zero_init: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=0)
        self.periodic_lon = periodic_lon
        if zero_init:  # residual branches and the output start at zero (DDPM++'s init_scale=0)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.periodic_lon:
            x = F.pad(x, (1, 1, 0, 0), mode="circular")
            x = F.pad(x, (0, 0, 1, 1))
        else:
            x = F.pad(x, (1, 1, 1, 1))
        return self.conv(x)


class _ResBlock(nn.Module):
    """DDPM++ residual block with FiLM conditioning on the noise embedding ``emb [B, E]``."""

    def __init__(self, cin: int, cout: int, emb_dim: int | None, dropout: float, periodic_lon: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = _Conv3x3(cin, cout, periodic_lon)
        self.film = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _Conv3x3(cout, cout, periodic_lon, zero_init=True)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None and emb is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return (self.skip(x) + h) / math.sqrt(2)


class _Attention(nn.Module):
    """Multi-head self-attention over all grid points (Vaswani et al. 2017), residual."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        heads = heads if channels % heads == 0 else 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        h, _ = self.attn(h, h, h, need_weights=False)
        return (x + h.transpose(1, 2).reshape(B, C, H, W)) / math.sqrt(2)


def noise_embedding(c: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(c w_k), sin(c w_k)]`` of the scalar noise input ``c [B]`` with
    frequencies ``w_k = max_period^(-k / (dim/2))`` (Vaswani et al. 2017; DDPM's timestep
    embedding). ``c`` is EDM's ``c_noise = log(sigma)/4`` (order 1), so it is scaled by 100 first:
    the features then resolve noise-level changes from ~0.01 to ~100 units of ``c``.
    Returns ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=c.dtype, device=c.device) / half)
    arg = (100.0 * c)[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class UNet(nn.Module):
    """``UNet(x [B, in_channels, H, W], noise [B] | None) -> [B, out_channels, H, W]``.

    Args:
        in_channels, out_channels: channel counts of input and output.
        base: channels at the finest level; level ``i`` has ``base * mults[i]`` channels.
        mults: channel multipliers per resolution level (``len(mults)`` levels; each level after the
            first halves ``H`` and ``W``).
        blocks: residual blocks per level on the way down (``blocks + 1`` on the way up).
        attn_levels: levels (0 = finest) that get a self-attention block after each residual block.
        time_embedding: whether a noise input is embedded and fed to every block (False for the
            regression network, which then takes ``noise=None``).
        dropout: dropout rate inside residual blocks.
        periodic_lon: circular padding along the last axis (global longitude grids).
        mid_attention: self-attention at the coarsest level (DDPM++ has it; its cost grows as the
            square of the number of coarsest-level grid points).

    ``config`` holds these constructor arguments as JSON, so checkpoints rebuild the network.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base: int = 32,
        mults: tuple[int, ...] | list[int] = (1, 2, 2),
        blocks: int = 2,
        attn_levels: tuple[int, ...] | list[int] = (),
        time_embedding: bool = True,
        dropout: float = 0.0,
        periodic_lon: bool = False,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        mults, attn_levels = tuple(int(m) for m in mults), tuple(int(a) for a in attn_levels)
        _validate(in_channels, out_channels, base, mults, blocks, attn_levels, dropout)
        self._config = {
            "in_channels": int(in_channels), "out_channels": int(out_channels), "base": int(base),
            "mults": list(mults), "blocks": int(blocks), "attn_levels": list(attn_levels),
            "time_embedding": bool(time_embedding), "dropout": float(dropout),
            "periodic_lon": bool(periodic_lon), "mid_attention": bool(mid_attention),
        }
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.levels, self.periodic_lon = len(mults), bool(periodic_lon)
        self.emb_dim = 4 * base if time_embedding else None
        if time_embedding:
            self.embed = nn.Sequential(nn.Linear(base, self.emb_dim), nn.SiLU(),
                                       nn.Linear(self.emb_dim, self.emb_dim))
        self.stem = _Conv3x3(in_channels, base, periodic_lon)
        self.down, skips, ch = self._build_down(base, mults, blocks, attn_levels, dropout)
        mid: list[nn.Module] = [_ResBlock(ch, ch, self.emb_dim, dropout, periodic_lon)]
        if mid_attention:
            mid.append(_Attention(ch))
        mid.append(_ResBlock(ch, ch, self.emb_dim, dropout, periodic_lon))
        self.mid = nn.ModuleList(mid)
        self.up = self._build_up(base, mults, blocks, attn_levels, dropout, skips, ch)
        self.head_norm = nn.GroupNorm(_groups(base), base)
        self.head = _Conv3x3(base, out_channels, periodic_lon, zero_init=True)

    def _build_down(self, base, mults, blocks, attn_levels, dropout):
        layers, skips, ch = nn.ModuleList(), [base], base
        for lvl, m in enumerate(mults):
            if lvl > 0:
                layers.append(_Down(ch, self.periodic_lon))
                skips.append(ch)
            for _ in range(blocks):
                layers.append(_ResBlock(ch, base * m, self.emb_dim, dropout, self.periodic_lon))
                ch = base * m
                if lvl in attn_levels:
                    layers.append(_Attention(ch))
                skips.append(ch)
        return layers, skips, ch

    def _build_up(self, base, mults, blocks, attn_levels, dropout, skips, ch):
        layers = nn.ModuleList()
        for lvl in reversed(range(len(mults))):
            for _ in range(blocks + 1):
                layers.append(_ResBlock(ch + skips.pop(), base * mults[lvl], self.emb_dim, dropout,
                                        self.periodic_lon))
                ch = base * mults[lvl]
                if lvl in attn_levels:
                    layers.append(_Attention(ch))
            if lvl > 0:
                layers.append(_Up(ch, self.periodic_lon))
        return layers

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON), for ``sciddiff.training`` checkpoints."""
        return dict(self._config, mults=list(self._config["mults"]),
                    attn_levels=list(self._config["attn_levels"]))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        emb = None
        if self.emb_dim is not None:
            if noise is None:
                raise ValueError("UNet: this network embeds a noise level; pass noise [B]")
            noise = noise.to(x.dtype).reshape(-1).expand(x.shape[0])
            emb = self.embed(noise_embedding(noise, self._config["base"]))
        H, W = x.shape[-2:]
        x = self._pad(x)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb)
            if not isinstance(layer, _Attention):
                hs.append(h)
            else:
                hs[-1] = h
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, _ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h, emb)
        out = self.head(F.silu(self.head_norm(h)))
        return out[..., :H, :W]

    def _pad(self, x: Tensor) -> Tensor:
        """Pad ``H`` and ``W`` up to multiples of ``2**(levels-1)`` (bottom/right), periodically in
        longitude where ``periodic_lon``, else by edge replication (no artificial zero edge)."""
        m = 2 ** (self.levels - 1)
        ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
        if pw:
            x = F.pad(x, (0, pw, 0, 0), mode="circular" if self.periodic_lon else "replicate")
        if ph:
            x = F.pad(x, (0, 0, 0, ph), mode="replicate")
        return x


class _Down(nn.Module):
    """2x2 average pooling, then a 3x3 convolution."""

    def __init__(self, ch: int, periodic_lon: bool) -> None:
        super().__init__()
        self.conv = _Conv3x3(ch, ch, periodic_lon)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.avg_pool2d(x, 2))


class _Up(nn.Module):
    """Nearest-neighbour upsampling by 2, then a 3x3 convolution."""

    def __init__(self, ch: int, periodic_lon: bool) -> None:
        super().__init__()
        self.conv = _Conv3x3(ch, ch, periodic_lon)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _validate(cin, cout, base, mults, blocks, attn_levels, dropout) -> None:
    if int(cin) < 1 or int(cout) < 1:
        raise ValueError(f"UNet: in_channels and out_channels must be >= 1, got {cin}, {cout}")
    if int(base) < 2 or int(base) % 2:
        raise ValueError(f"UNet: base must be an even number >= 2, got {base}")
    if not mults or any(m < 1 for m in mults):
        raise ValueError(f"UNet: mults must be a non-empty list of positive integers, got {list(mults)}")
    if int(blocks) < 1:
        raise ValueError(f"UNet: blocks must be >= 1, got {blocks}")
    bad = [a for a in attn_levels if not 0 <= a < len(mults)]
    if bad:
        raise ValueError(f"UNet: attn_levels {bad} outside the {len(mults)} levels 0..{len(mults) - 1}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
