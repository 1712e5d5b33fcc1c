"""Reports of the sampler benchmark: Markdown tables and the error-against-NFE plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import LIBRARIES, fmt, md_table, median

if TYPE_CHECKING:
    from .samplers import Problem

# ================================================================================================
# Reports
# ================================================================================================
def _ok(r: dict[str, Any]) -> bool:
    return r["error"] is not None


LEARNED = "learned"   # the schedule of rows on grids learned for the problem (learn_grid)


def best_rows(records: list[dict[str, Any]], problem: str, library: str, nfe: int,
              kind: str = "ode", learned: bool = True) -> dict[str, Any] | None:
    """The most accurate row; ``learned=False`` leaves out rows on learned grids."""
    cands = [r for r in records if r["problem"] == problem and r["library"] == library
             and r["nfe_budget"] == nfe and r["kind"] == kind and _ok(r)
             and (learned or r["schedule"] != LEARNED)]
    return min(cands, key=lambda r: r["error"]) if cands else None


def _config(r: dict[str, Any]) -> str:
    return f"{r['sampler']} / {r['schedule']}"


def overhead_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per-step overhead (us) per problem and library, over the deterministic (ODE) rows that
    ran: diffusers has no stochastic rows here, and drawing fresh noise each step is sampling work
    rather than bookkeeping, so counting it would compare unlike things."""
    out = []
    for p in dict.fromkeys(r["problem"] for r in records):
        row: dict[str, Any] = {"problem": p}
        for lib in LIBRARIES:
            rs = [r for r in records if r["problem"] == p and r["library"] == lib
                  and r["kind"] == "ode" and r["overhead_per_step_us"] is not None]
            row[lib] = median(r["overhead_per_step_us"] for r in rs)
            row[f"{lib}_model_us"] = median(r["model_seconds"] / r["nfe"] * 1e6 for r in rs if r["nfe"])
            row[f"{lib}_rows"] = len(rs)
        out.append(row)
    return out


def matched_overheads(records: list[dict[str, Any]], problem: str,
                      pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]]) -> list[dict[str, Any]]:
    """Per matched pair ``((sampler, schedule) in sciddiff, (sampler, schedule) in diffusers)``: the
    median per-step overheads over the NFE both ran, their ratio and the largest relative error gap."""
    out = []
    for (s_smp, s_sch), (d_smp, d_sch) in pairs:
        sel = {lib: {r["nfe_budget"]: r for r in records if r["problem"] == problem and r["library"] == lib
                     and (r["sampler"], r["schedule"]) == key}
               for lib, key in (("sciddiff", (s_smp, s_sch)), ("diffusers", (d_smp, d_sch)))}
        common = [n for n in sel["sciddiff"] if n in sel["diffusers"]
                  and _ok(sel["sciddiff"][n]) and _ok(sel["diffusers"][n])]
        if not common:
            continue
        o_s = median(sel["sciddiff"][n]["overhead_per_step_us"] for n in common)
        o_d = median(sel["diffusers"][n]["overhead_per_step_us"] for n in common)
        gap = max(abs(sel["sciddiff"][n]["error"] - sel["diffusers"][n]["error"])
                  / max(sel["diffusers"][n]["error"], 1e-300) for n in common)
        out.append({"sciddiff": f"{s_smp} / {s_sch}", "diffusers": f"{d_smp} / {d_sch}", "sciddiff_us": o_s,
                    "diffusers_us": o_d, "ratio": o_s / o_d if o_s and o_d else None, "gap": gap})
    return out


def write_markdown(path: Path, records: list[dict[str, Any]], problems: list[Problem], nfes: Sequence[int],
                   meta: dict[str, Any], descriptions: dict[str, str],
                   matched_pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]]) -> None:
    L: list[str] = ["# Sampler benchmark: exact-score Gaussian mixtures", ""]
    L.append(f"Hardware: {meta['hardware']}")
    L.append("")
    L.append(
        f"Mode: {meta['mode']}; {meta['n_samples']} samples per problem, seed {meta['seed']}; process "
        "`VP(timesteps=1000)` (DDPM linear betas 1e-4..0.02); start: exact `x_T` at t = 999; reference: "
        f"dopri5 PF-ODE solve in float64, rtol = atol = {meta['ref_tol']:g}. Error: mean Euclidean "
        "distance to the reference. NFE = model calls (the budget; rows record the calls made). "
        f"Timing: fastest of {meta.get('repeats', 1)} runs per row, taken in rounds over all rows of a "
        "problem (wall time of grid or `set_timesteps` plus the sampling loop). "
        f"Total wall time {meta['wall_seconds']:.1f} s."
    )
    L.append("")
    L.append("Problems:")
    for p in problems:
        src = "cached" if p.ref_cached else f"computed in {p.ref_seconds:.1f} s"
        L.append(f"- `{p.name}`: {descriptions[p.name]}; reference {src} ({p.ref_nfe} evaluations)")
    L += ["", "Notes:",
          "- diffusers rows: DDPM's betas passed explicitly (HeunDiscreteScheduler defaults to other "
          "betas), `timestep_spacing=\"trailing\"`, `clip_sample=False`; the exact eps is evaluated at the "
          "scheduler's own noise level for each call. diffusers keeps `alphas_cumprod` and sigmas in "
          "float32, and DPMSolverMultistep and EulerDiscrete cast the sample to float32 inside `step`, so "
          "their results carry float32 rounding (about 1e-6 relative here, far below the errors).",
          "- Grids that end at t = 0 (sigma = 0.01) finish with one denoising jump to sigma = 0; against "
          "the exact ODE solution this leaves an error floor (about 1.2e-3 in 2-D and 8e-3 in 64-D for "
          "components of std 0.05) that the NFE-50 rows of diffusers reach. sciddiff's `+adams` rows "
          "take an Adams-Bashforth step on eps in s = sigma/alpha instead (eps is linear in s near 0 "
          "for smooth densities, constant for point masses; the step is exact to leading order in both) "
          "and go below it. `trailing` grids stop at t = 1000/n - 1 and jump from there, hence their "
          "slow decay with NFE."]
    if meta.get("skipped"):
        L.append("")
        L.append("Not in this sciddiff (skipped): " + ", ".join(f"`{s}`" for s in meta["skipped"]))
    for w in meta.get("warnings", []):
        L += ["", f"**Warning:** {w}"]

    # --- summary: best of each library
    L += ["", "## Best sciddiff vs best diffusers (ODE samplers)", "",
          "Ratio = best sciddiff error / best diffusers error (below 1: sciddiff is more accurate). "
          "`fixed`: the best sciddiff row on a fixed schedule (no learned grid) and its ratio.", ""]
    rows = []

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        return a["error"] / b["error"] if a and b and b["error"] > 0 else None

    for p in problems:
        for nfe in nfes:
            b = {lib: best_rows(records, p.name, lib, nfe) for lib in LIBRARIES}
            fixed = best_rows(records, p.name, "sciddiff", nfe, learned=False)
            cells = [p.name, str(nfe)]
            for lib in LIBRARIES:
                r = b[lib]
                cells += [fmt(r["error"]) if r else "-", _config(r) if r else "-"]
            cells += [fmt(ratio(b["sciddiff"], b["diffusers"])),
                      fmt(fixed["error"]) if fixed else "-", _config(fixed) if fixed else "-",
                      fmt(ratio(fixed, b["diffusers"]))]
            rows.append(cells)
    L.append(md_table(["problem", "NFE", "best sciddiff", "config", "best diffusers", "config", "ratio",
                       "fixed", "config", "ratio (fixed)"],
                      rows, ["l", "r", "r", "l", "r", "l", "r", "r", "l", "r"]))

    learned = [r for r in records if r["schedule"] == LEARNED and "learn_seconds" in r]
    if learned:
        L += ["", "## Learned grids", "",
              "`sciddiff.samplers.learn_grid`: the grid of the sampler fitted by Adam to the reference "
              "solutions of separate starting points (seed and count below; never the scored x_T), through "
              "a differentiable twin of the sampler. Cost: `learn s` wall seconds and `learn NFE` model "
              "calls (each with a backward pass), once per problem, sampler and NFE. `vs logsnr`: error on "
              "the learned grid / error of the same sampler on `logsnr_uniform`.", ""]
        rows = []
        for r in learned:
            base = next((q for q in records if q["problem"] == r["problem"] and q["library"] == "sciddiff"
                         and q["sampler"] == r["sampler"] and q["schedule"] == "logsnr_uniform"
                         and q["nfe_budget"] == r["nfe_budget"] and _ok(q)), None)
            rows.append([r["problem"], r["sampler"], str(r["nfe_budget"]),
                         f"{r['train_samples']} (seed {r['train_seed']})", str(r["learn_iters"]),
                         fmt(r["learn_seconds"]), str(r["learn_nfe"]),
                         f"{fmt(r['train_loss_initial'])} -> {fmt(r['train_loss_best'])}",
                         fmt(r["error"]) if _ok(r) else "fail", fmt(ratio(r, base))])
        L.append(md_table(["problem", "sampler", "NFE", "train starts", "iters", "learn s", "learn NFE",
                           "train loss", "error", "vs logsnr"], rows,
                          ["l", "l", "r", "l", "r", "r", "r", "l", "r", "r"]))

    # --- overhead
    pairs = {p.name: matched_overheads(records, p.name, matched_pairs) for p in problems}
    L += ["", "## Per-step overhead (time outside the model call)", "",
          "`(seconds - model_seconds) / nfe` in microseconds. The verdict compares like with like: the "
          "median over the matched pairs below (the same algorithm on the same grid in both libraries) "
          "of the sciddiff / diffusers ratio. `all ODE rows`: medians over every deterministic row of "
          "each library, which are different sets of samplers (sciddiff's include order-3 and Adams "
          "rows, which do more vector work per step), so they are shown for information only. The "
          "model time is the whole network call, as a trained network's would be: for the exact model, "
          "its noise-level lookup (sciddiff: `alpha(t), sigma(t)` of the process; diffusers: the "
          "scheduler's sigma or `alphas_cumprod` for the call) and the mixture posterior; "
          "`model us/call` shows it.", ""]
    rows = []
    for o in overhead_summary(records):
        s, d = o["sciddiff"], o["diffusers"]
        like = median(x["ratio"] for x in pairs.get(o["problem"], []) if x["ratio"] is not None)
        verdict = "-" if like is None else ("yes" if like <= 1 else "no")
        rows.append([o["problem"], fmt(like), verdict, fmt(s), fmt(d), fmt(s / d if s and d else None),
                     fmt(o["sciddiff_model_us"]), fmt(o["diffusers_model_us"])])
    L.append(md_table(["problem", "like-for-like ratio", "sciddiff <= diffusers", "sciddiff us/step (all)",
                       "diffusers us/step (all)", "ratio (all ODE rows)", "model us/call (sciddiff)",
                       "model us/call (diffusers)"],
                      rows, ["l", "r", "l", "r", "r", "r", "r", "r"]))

    # --- matched pairs
    L += ["", "Like for like (the same algorithm on the same grid; median over NFE, us/step; `max rel. "
          "error gap`: the largest relative difference of the two errors over NFE, which should be "
          "at float32 level):", ""]
    rows = [[name, x["sciddiff"], x["diffusers"], fmt(x["sciddiff_us"]), fmt(x["diffusers_us"]),
             fmt(x["ratio"]), fmt(x["gap"], 2)] for name, xs in pairs.items() for x in xs]
    L.append(md_table(["problem", "sciddiff", "diffusers", "sciddiff us/step", "diffusers us/step", "ratio",
                       "max rel. error gap"], rows, ["l", "l", "l", "r", "r", "r", "r"]))

    # --- overhead per sampler
    L += ["", "Per sampler (median over schedules and NFE, us/step):", ""]
    keys = list(dict.fromkeys((r["library"], r["sampler"]) for r in records))
    rows = []
    for lib, smp in keys:
        cells = [lib, smp]
        for p in problems:
            sel = [r for r in records
                   if r["problem"] == p.name and r["library"] == lib and r["sampler"] == smp]
            cells.append(fmt(median(r["overhead_per_step_us"] for r in sel)))
        rows.append(cells)
    L.append(md_table(["library", "sampler"] + [p.name for p in problems], rows,
                      ["l", "l"] + ["r"] * len(problems)))

    # --- per-problem tables
    for p in problems:
        L += ["", f"## {p.name} (d = {p.dim})", "",
              "Error per sampler and schedule; **bold**: the best ODE row at that NFE. "
              "`sde` rows are stochastic samplers: their distance to the ODE solution is not a "
              "discretisation error.", ""]
        configs: dict[tuple, dict[int, dict[str, Any]]] = {}
        for r in records:
            if r["problem"] != p.name:
                continue
            key = (r["library"], r["sampler"], r["schedule"], r["kind"])
            cur = configs.setdefault(key, {}).get(r["nfe_budget"])
            if cur is None or (_ok(r) and (not _ok(cur) or r["error"] < cur["error"])):
                configs[key][r["nfe_budget"]] = r
        best = {nfe: min((r["error"] for by in configs.values() for n, r in by.items()
                          if n == nfe and _ok(r) and r["kind"] == "ode"), default=None) for nfe in nfes}
        order = sorted(configs, key=lambda k: (LIBRARIES.index(k[0]) if k[0] in LIBRARIES else 9,
                                               k[3] != "ode"))
        rows = []
        for key in order:
            cells = [key[0], key[1], key[2], key[3]]
            for nfe in nfes:
                r = configs[key].get(nfe)
                if r is None:
                    cells.append("")
                elif not _ok(r):
                    cells.append("fail")
                else:
                    txt = fmt(r["error"])
                    if r["kind"] == "ode" and r["error"] == best[nfe]:
                        txt = f"**{txt}**"
                    if r["nfe"] != nfe:
                        txt += f" ({r['nfe']})"
                    cells.append(txt)
            rows.append(cells)
        L.append(md_table(["library", "sampler", "schedule", "kind"] + [f"NFE {n}" for n in nfes], rows,
                          ["l", "l", "l", "l"] + ["r"] * len(nfes)))
        L.append("")
        L.append("A number in parentheses: the calls actually made, where fewer than the budget.")

    fails = [r for r in records if not _ok(r)]
    if fails:
        L += ["", "## Failed rows", ""]
        seen = set()
        for r in fails:
            key = (r["library"], r["sampler"], r["schedule"], r["note"])
            if key in seen:
                continue
            seen.add(key)
            n_same = sum(1 for q in fails if (q["library"], q["sampler"], q["schedule"], q["note"]) == key)
            L.append(f"- {r['library']} {r['sampler']} / {r['schedule']} ({n_same} rows): {r['note']}")
    L.append("")
    path.write_text("\n".join(L), encoding="utf-8")


def write_plot(path: Path, records: list[dict[str, Any]], problems: list[Problem],
               nfes: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sciddiff": "tab:blue", "diffusers": "tab:orange"}
    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.4), squeeze=False)
    for ax, p in zip(axes[0], problems, strict=True):
        rs = [r for r in records if r["problem"] == p.name and _ok(r) and r["error"] > 0]
        lines: dict[tuple, list[tuple[int, float]]] = {}
        for r in rs:
            lines.setdefault((r["library"], r["sampler"], r["schedule"], r["kind"]), []).append(
                (r["nfe_budget"], r["error"]))
        for (lib, _, _, kind), pts in lines.items():
            pts.sort()
            ax.plot(*zip(*pts, strict=True), color=colors.get(lib, "gray"), alpha=0.18, lw=0.8,
                    ls="-" if kind == "ode" else ":")
        for lib in LIBRARIES:
            pts = [(n, b["error"]) for n in nfes if (b := best_rows(records, p.name, lib, n))]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=colors[lib], lw=2.4, marker="o",
                        label=f"{lib} (best ODE)")
        if any(r["schedule"] == LEARNED for r in rs):
            pts = [(n, b["error"]) for n in nfes
                   if (b := best_rows(records, p.name, "sciddiff", n, learned=False))]
            ax.plot(*zip(*pts, strict=True), color=colors["sciddiff"], lw=1.6, ls="--", marker=".",
                    label="sciddiff (best fixed schedule)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(nfes))
        ax.set_xticklabels([str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
        ax.set_ylabel("mean distance to the PF-ODE reference")
        ax.set_title(f"{p.name} (d = {p.dim})")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Sampler error vs NFE (faint: every sampler/schedule; dotted: stochastic)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
