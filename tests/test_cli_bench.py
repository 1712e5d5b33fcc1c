"""The ``sciddiff`` command line and the sampler benchmark (tiny configurations)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from sciddiff import cli

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")

REQUIRED = {"problem", "library", "sampler", "schedule", "nfe", "error", "seconds", "nfe_budget", "kind",
            "model_seconds", "overhead_per_step_us", "note"}


@pytest.fixture(scope="module")
def B():
    """The benchmark module, loaded the way the CLI loads it."""
    return cli.load_benchmark("samplers")


@pytest.fixture(scope="module")
def tiny(B, tmp_path_factory):
    """gmm2d, 200 samples, NFE 10, one timed run per row."""
    out = tmp_path_factory.mktemp("bench")
    records = B.run(out, quick=True, problems=["gmm2d"], quiet=True, n_samples=200, nfes=[10], repeats=1)
    return out, records


def _row(records, library, sampler, schedule, nfe=10):
    (r,) = [r for r in records if (r["library"], r["sampler"], r["schedule"], r["nfe_budget"])
            == (library, sampler, schedule, nfe)]
    return r


def test_run_writes_files_and_records(tiny):
    out, records = tiny
    for name in ("samplers.json", "samplers.md", "samplers.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "samplers.json").read_text()) == records
    assert records and all(REQUIRED <= set(r) for r in records)
    assert {r["problem"] for r in records} == {"gmm2d"}
    md = (out / "samplers.md").read_text()
    assert "Best sciddiff vs best diffusers" in md and "overhead" in md.lower() and "CPU:" in md
    # The reference is cached for reruns.
    assert list((out / "cache").glob("ref-gmm2d-seed0-n200-*.pt"))


def test_rows_cover_the_registry_and_respect_the_budget(B, tiny):
    _, records = tiny
    sci = [r for r in records if r["library"] == "sciddiff"]
    names = {e.title for e in B.SCIDDIFF_SAMPLERS if e.resolve() is not None}
    schedules = {s.title for s in B.SCHEDULES if s.resolve() is not None}
    learned = {(e.title, B.LEARNED_SCHEDULE) for e in B.LEARNED_SAMPLERS}
    fixed = {(n, s) for n in names for s in schedules}
    assert {(r["sampler"], r["schedule"]) for r in sci} == fixed | learned
    for r in records:
        if r["nfe"] is not None:
            assert 1 <= r["nfe"] <= r["nfe_budget"] == 10
            assert r["seconds"] >= r["model_seconds"] > 0
            assert math.isfinite(r["overhead_per_step_us"])
    # Heun and one-corrector PC spend 2 * steps - 1 calls: 5 steps in a budget of 10.
    assert _row(records, "sciddiff", "heun", "trailing")["nfe"] == 9
    assert _row(records, "sciddiff", "pc_langevin", "trailing")["nfe"] == 9
    assert _row(records, "sciddiff", "ddim", "trailing")["nfe"] == 10
    # ODE samplers: finite errors, and small ones for the good ones.
    for r in sci:
        if r["kind"] == "ode":
            assert r["error"] is not None and math.isfinite(r["error"]), r
        assert r["kind"] in ("ode", "sde")
    assert _row(records, "sciddiff", "dpmpp_2m", "logsnr_uniform")["error"] < 0.1


@needs_diffusers
def test_diffusers_rows(tiny):
    _, records = tiny
    dif = [r for r in records if r["library"] == "diffusers"]
    assert {r["sampler"] for r in dif} >= {"DDIM", "DPMSolver++(2M)", "DPMSolver++(3M)", "UniPC", "Euler",
                                           "Heun"}
    for r in dif:
        assert (r["error"] is not None) or r["note"], r   # a failure is a row with a note, not a crash
    assert _row(records, "diffusers", "Heun", "trailing")["nfe"] == 9
    # Same algorithm, same grid: the errors agree (to float32 precision of diffusers' tables).
    for (s_smp, s_sch), (d_smp, d_sch) in [(("ddim", "trailing"), ("DDIM", "trailing")),
                                           (("heun", "trailing"), ("Heun", "trailing")),
                                           (("dpmpp_2m", "trailing"), ("DPMSolver++(2M)", "trailing")),
                                           (("dpmpp_2m", "edm_rho"), ("DPMSolver++(2M)", "karras"))]:
        a = _row(records, "sciddiff", s_smp, s_sch)["error"]
        b = _row(records, "diffusers", d_smp, d_sch)["error"]
        assert a == pytest.approx(b, rel=1e-3), (s_smp, s_sch, d_smp, d_sch)


@needs_diffusers
def test_ddim_equals_diffusers_ddim_on_the_trailing_grid(B, tiny):
    """sciddiff's ddim on ``trailing`` and diffusers' DDIMScheduler(timestep_spacing="trailing") are the
    same algorithm at the same times (999, 899, ..., 99, then the clean point). They differ only by
    diffusers' float32 ``alphas_cumprod``; with that table in float64 they agree to rounding."""
    out, _ = tiny
    prob = B.make_problem("gmm2d", 200, 0, out / "cache")
    ours = B.sample_sciddiff(B.SamplerEntry("ddim"), B.ScheduleEntry("trailing"), prob, 10)
    ddim = next(e for e in B.DIFFUSERS_SCHEDULERS if e.cls == "DDIMScheduler")
    theirs = B.sample_diffusers(ddim, prob, 10)
    theirs64 = B.sample_diffusers(ddim, prob, 10, float64_tables=True)
    assert ours.nfe == theirs.nfe == theirs64.nfe == 10
    scale = float(prob.x_T.abs().max())
    assert float((ours.x - theirs.x).abs().max()) < 1e-5 * scale     # float32 alpha_bar table
    assert float((ours.x - theirs64.x).abs().max()) < 1e-12 * scale   # the same arithmetic


def test_mixture_denoiser_matches_gaussian_mixture(B):
    for name in B.PROBLEMS:
        dist = B.PROBLEMS[name].make().to(torch.float64)
        den = B.MixtureDenoiser(dist)
        x = dist.sample(50, torch.Generator().manual_seed(3))
        den.check(x, tol=1e-11)
        for a, s in [(0.1, 0.99), (0.9, 0.3), (1.0, 0.02)]:
            at, st = torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            y = a * x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
            torch.testing.assert_close(den(y, at, st), dist.denoise(y, at, st), rtol=1e-10, atol=1e-11)


def test_registry_skips_missing_names(B):
    assert B.SamplerEntry("no_such_sampler").resolve() is None
    assert B.ScheduleEntry("no_such_schedule").resolve() is None
    assert B.SamplerEntry("ddim").resolve() is not None


def test_cli_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "samplers", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("sciddiff ")


def test_python_dash_m_sciddiff():
    res = subprocess.run([sys.executable, "-m", "sciddiff", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "bench" in res.stdout


def test_missing_benchmarks_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(cli.CLIError, match="source checkout with the benchmarks/ folder"):
        cli.load_benchmark("samplers", root=tmp_path)
    monkeypatch.setattr(cli, "repo_root", lambda: tmp_path)
    assert cli.main(["bench", "samplers", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "needs a source checkout with the benchmarks/ folder" in capsys.readouterr().err


def test_cli_bench_end_to_end(tiny, tmp_path):
    out = tmp_path / "cli"
    shutil.copytree(tiny[0] / "cache", out / "cache")   # reuse the cached reference
    rc = cli.main(["bench", "samplers", "--out", str(out), "--quick", "--quiet", "--problems", "gmm2d",
                   "--samples", "200", "--nfe", "5", "--repeats", "2"])
    assert rc == 0
    records = json.loads((out / "samplers.json").read_text())
    assert {r["nfe_budget"] for r in records} == {5}


def test_cli_rejects_an_unknown_problem(tmp_path, capsys):
    assert cli.main(["bench", "samplers", "--out", str(tmp_path), "--quiet", "--problems", "nope"]) == 2
    assert "unknown problem" in capsys.readouterr().err


def test_without_diffusers_the_sciddiff_rows_still_run(B, tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nodiff"
    shutil.copytree(tiny[0] / "cache", out / "cache")
    monkeypatch.setattr(B, "diffusers_available", lambda: False)
    records = B.run(out, problems=["gmm2d"], quiet=True, n_samples=200, nfes=[5], repeats=1)
    assert records and {r["library"] for r in records} == {"sciddiff"}
    assert "diffusers is not installed" in capsys.readouterr().err
    assert "diffusers is not installed" in (out / "samplers.md").read_text()


def test_learned_grid_rows_are_scored_on_points_they_never_saw(B, tiny):
    out, records = tiny
    r = _row(records, "sciddiff", "unipc(2)", B.LEARNED_SCHEDULE)
    assert r["train_seed"] != r["seed"] and r["train_samples"] == B.QUICK_LEARN.n_train
    assert r["learn_seconds"] > 0 and r["learn_nfe"] == (B.QUICK_LEARN.iters + 1) * 10
    assert r["train_loss_best"] < r["train_loss_initial"] and len(r["grid_t"]) == 10
    base = _row(records, "sciddiff", "unipc(2)", "logsnr_uniform")
    assert r["error"] < 0.5 * base["error"]
    assert list((out / "cache").glob(f"ref-gmm2d-seed{r['train_seed']}-n{r['train_samples']}-*.pt"))
    md = (out / "samplers.md").read_text()
    assert "## Learned grids" in md and "ratio (fixed)" in md and "like-for-like ratio" in md
