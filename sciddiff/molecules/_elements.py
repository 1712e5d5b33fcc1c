"""Element symbols <-> atomic numbers for the first 4 periods (QM9 and common drug-like atoms)."""

from __future__ import annotations

_SYMBOLS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr"
).split()
_Z = {s: i + 1 for i, s in enumerate(_SYMBOLS)}


def atomic_number(symbol: str, where: str = "") -> int:
    """Atomic number of ``symbol`` (case-insensitive: ``"cl"`` -> 17); clear error otherwise."""
    s = symbol.strip()
    key = s[:1].upper() + s[1:].lower()
    if key not in _Z:
        loc = f"{where}: " if where else ""
        raise ValueError(f"{loc}unknown element {symbol!r}")
    return _Z[key]


def symbol_of(z: int) -> str:
    if not 1 <= z <= len(_SYMBOLS):
        raise ValueError(f"unknown atomic number {z}")
    return _SYMBOLS[z - 1]
