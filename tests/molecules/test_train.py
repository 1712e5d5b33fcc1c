"""Molecule training: config validation, EDM's polynomial schedule, the data pipeline, a tiny
end-to-end train-and-sample run on real QM9 molecules, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sciddiff.core import ZeroCoM
from sciddiff.molecules._config import ConfigError, MoleculeTrainConfig
from sciddiff.molecules._train import (
    PolynomialVP,
    QM9Dataset,
    collate_molecules,
    train_molecules,
)
from sciddiff.training import load_checkpoint, process_config, process_from_config

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}
TINY = {"backbone_kwargs": {"hidden": 16, "layers": 2}, "batch_size": 16, "limit": 64, "lr": 2e-3,
        "ema_decay": 0.99, "grad_clip": None, "checkpoint_every": 1000}


def _write(tmp_path, obj, name="cfg.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


# ------------------------------------------------------------------------------------------------
# config
@pytest.mark.parametrize("obj, key, words", [
    ({"lr": 1e-4, "batch_sise": 8}, "batch_sise", "did you mean 'batch_size'"),
    ({"lr": -1.0}, "lr", "must be > 0"),
    ({"batch_size": "64"}, "batch_size", "expected int"),
    ({"max_steps": True}, "max_steps", "expected int"),
    ({"process": "ddpm"}, "process", "'vp' | 'edm' | 'flow'"),
    ({"ema_decay": 1.0}, "ema_decay", "[0, 1)"),
    ({"grad_clip": "auto"}, "grad_clip", "'adaptive'"),
    ({"process": "edm", "param": "eps"}, "param", "predicts x0"),
    ({"backbone_kwargs": {"hidden": 8, "widht": 3}}, "backbone_kwargs", "widht"),
    ({"backbone_kwargs": {"h_dim": 4}}, "backbone_kwargs", "h_dim must be 5"),
    ({"time": "lognormal", "time_kwargs": {"p_meen": 0.0}}, "time_kwargs", "p_meen"),
])
def test_config_errors_name_file_and_key(tmp_path, obj, key, words):
    path = _write(tmp_path, obj)
    with pytest.raises(ConfigError) as e:
        MoleculeTrainConfig.from_json(path)
    msg = str(e.value)
    assert str(path) in msg and repr(key) in msg and words in msg, msg
    assert e.value.key == key


def test_config_invalid_json_and_missing_file(tmp_path):
    path = _write(tmp_path, '{"lr": 1e-4,\n "batch_size": }')
    with pytest.raises(ConfigError, match=r"cfg\.json: invalid JSON at line 2"):
        MoleculeTrainConfig.from_json(path)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        MoleculeTrainConfig.from_json(_write(tmp_path, "[1, 2]"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        MoleculeTrainConfig.from_json(tmp_path / "nope.json")


def test_config_round_trip_and_process_defaults(tmp_path):
    cfg = MoleculeTrainConfig(process="edm", lr=3, limit=5, backbone_kwargs={"hidden": 8})
    assert isinstance(cfg.lr, float) and cfg.lr == 3.0  # ints accepted where floats are expected
    again = MoleculeTrainConfig.from_json(_write(tmp_path, cfg.to_dict()))
    assert again == cfg
    assert (cfg.resolved_param, cfg.resolved_weighting, cfg.resolved_time) == ("x0", "edm", "lognormal")
    flow = MoleculeTrainConfig(process="flow")
    assert (flow.resolved_param, flow.resolved_weighting, flow.resolved_time) == (
        "velocity", "simple", "uniform")


def test_process_comparison_configs_differ_only_in_the_process():
    """benchmarks/configs: the VP vs flow-matching comparison trains both at the same budget."""
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
    vp = MoleculeTrainConfig.from_json(root / "qm9_vp_4k.json")
    flow = MoleculeTrainConfig.from_json(root / "qm9_flow_4k.json")
    assert (vp.process, flow.process) == ("vp", "flow")
    same = ("backbone", "backbone_kwargs", "lr", "batch_size", "max_steps", "seed", "ema_decay", "h_scale")
    assert all(getattr(vp, k) == getattr(flow, k) for k in same)


def test_presets():
    edm = MoleculeTrainConfig.preset("edm")
    kw = edm.backbone_kwargs
    assert (kw["hidden"], kw["layers"], edm.batch_size, edm.lr, edm.ema_decay) == (256, 9, 64, 1e-4, 0.999)
    assert (edm.process, edm.schedule, edm.resolved_param) == ("vp", "polynomial", "eps")
    cpu, gpu = MoleculeTrainConfig.preset("cpu"), MoleculeTrainConfig.preset("gpu")
    assert cpu.backbone_kwargs["hidden"] < 256 and gpu.backbone_kwargs["hidden"] == 256
    with pytest.raises(ValueError, match="unknown preset 'tpu'"):
        MoleculeTrainConfig.preset("tpu")


# ------------------------------------------------------------------------------------------------
# EDM's polynomial schedule
def _edm_polynomial_alphas2(T: int, s: float, power: float = 2.0) -> np.ndarray:
    """EDM's code (e3_diffusion_for_molecules, ``polynomial_schedule`` + ``clip_noise_schedule``)."""
    steps = T + 1
    x = np.linspace(0, steps, steps)
    a2 = (1 - np.power(x / steps, power)) ** 2
    a2 = np.concatenate([np.ones(1), a2])
    a2 = np.cumprod(np.clip(a2[1:] / a2[:-1], 0.001, 1.0))
    return (1 - 2 * s) * a2 + s


def test_polynomial_vp_matches_edm_discrete_schedule():
    T, s = 1000, 1e-5
    ref = _edm_polynomial_alphas2(T, s)
    t = torch.arange(T + 1, dtype=torch.float64) / T
    ours = PolynomialVP(2.0, s).alpha(t) ** 2
    # EDM's clip touches only the last steps; everywhere else the schedules agree exactly.
    torch.testing.assert_close(ours[: T - 5], torch.from_numpy(ref[: T - 5]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polynomial_vp_identities(dtype):
    p = PolynomialVP()
    t = torch.linspace(0, 1, 101, dtype=dtype)
    a, sg = p.alpha(t), p.sigma(t)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(a**2 + sg**2, torch.ones_like(t), **tol)
    torch.testing.assert_close(p.log_snr(t), torch.log(a**2 / sg**2), **tol)
    inner = t[5:-5]  # away from the ends, where log-SNR is flat in t and the inverse ill-conditioned
    torch.testing.assert_close(p.t_of_log_snr(p.log_snr(inner)), inner, rtol=1e-3 if dtype == torch.float32
                               else 1e-9, atol=1e-4 if dtype == torch.float32 else 1e-9)
    assert bool((p.log_snr(t)[1:] < p.log_snr(t)[:-1]).all())
    again = process_from_config(process_config(PolynomialVP(3.0, 1e-4)))
    assert isinstance(again, PolynomialVP) and (again.power, again.s) == (3.0, 1e-4)


# ------------------------------------------------------------------------------------------------
# data pipeline
def test_collate_matches_molecules_to_state():
    from sciddiff.molecules._convert import molecules_to_state
    from sciddiff.molecules._types import Molecule

    g = torch.Generator().manual_seed(0)
    items = [(torch.tensor(z), torch.randn(len(z), 3, generator=g) + 5.0)
             for z in ([6, 1, 1, 1, 1], [8, 1, 1], [7, 6, 9, 1])]
    x = collate_molecules(items, h_scale=0.25)
    ref = molecules_to_state([Molecule(z.numpy(), p.double().numpy()) for z, p in items], torch.float32)
    assert x.num_systems == 3 and isinstance(x.constraint("pos"), ZeroCoM)
    torch.testing.assert_close(x["pos"], ref["pos"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x["h"], 0.25 * ref["h"])
    assert torch.equal(x.batch["pos"], ref.batch["pos"]) and x.batch["h"] is x.batch["pos"]
    com = torch.zeros(3, 3).index_add_(0, x.batch["pos"], x["pos"])
    assert com.abs().max() < 1e-5


def test_collate_rejects_unknown_elements():
    items = [(torch.tensor([6, 1]), torch.zeros(2, 3)), (torch.tensor([16, 1]), torch.zeros(2, 3))]
    with pytest.raises(ValueError, match="molecule 1 of the batch has atomic number 16"):
        collate_molecules(items)


# ------------------------------------------------------------------------------------------------
# end to end on real QM9 molecules (the first 400 GDB-9 rows, split as EDM's sizes)
@pytest.fixture(scope="module")
def tiny_qm9(tmp_path_factory):
    """``load_qm9`` restricted to the first 400 rows of QM9 (built once into a temporary cache)."""
    import sciddiff.molecules._qm9 as qm9

    cache = tmp_path_factory.mktemp("qm9cache")
    original = qm9.load_qm9
    try:
        original("train", cache_dir=cache, limit=400)
    except ImportError as e:
        pytest.skip(f"QM9 needs the qm9pack package: {e}")
    mp = pytest.MonkeyPatch()
    mp.setattr(qm9, "load_qm9", lambda split, cache_dir=None: original(split, cache_dir=cache, limit=400))
    yield qm9.load_qm9
    mp.undo()


@pytest.fixture(scope="module")
def trained(tiny_qm9, tmp_path_factory):
    out = tmp_path_factory.mktemp("vp")
    cfg = MoleculeTrainConfig(**TINY, max_steps=150, log_every=25, val_every=75, val_molecules=32)
    assert train_molecules(cfg, out, progress=False, trainer_kwargs=QUIET) == out
    return out


def test_training_lowers_the_loss_and_writes_the_model(trained):
    history = json.loads((trained / "history.json").read_text())
    assert [r["step"] for r in history] == [25, 50, 75, 100, 125, 150]
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    assert last < 0.7 * first, history
    assert "val_loss" in history[2] and np.isfinite(history[2]["val_loss"])
    info = json.loads((trained / "molecule.json").read_text())
    assert info["atom_types"] == ["H", "C", "N", "O", "F"] and info["h_scale"] == 0.25
    assert info["training"]["steps"] == 150 and info["training"]["molecules"] == 64
    assert info["training"]["wall_time_s"] > 0 and info["training"]["device"].startswith("cpu")
    assert sum(info["num_atoms"]["frequencies"]) == 64
    assert load_checkpoint(trained).global_step == 150
    assert MoleculeTrainConfig.from_json(trained / "config.json").param == "eps"


def test_samples_decode_with_requested_sizes(trained):
    from sciddiff.molecules._generate import sample_molecules

    sizes = [3, 5, 9, 12, 17, 20]
    mols = sample_molecules(6, checkpoint=trained, num_atoms=sizes, seed=0, nfe=10, batch_size=4)
    assert [len(m) for m in mols] == sizes
    for m in mols:
        assert np.isfinite(m.positions).all()
        assert np.abs(m.positions.mean(0)).max() < 1e-4  # zero centre of mass
        assert set(m.numbers.tolist()) <= {1, 6, 7, 8, 9}
    same = sample_molecules(6, checkpoint=trained, num_atoms=sizes, seed=0, nfe=10, batch_size=4)
    one_batch = sample_molecules(6, checkpoint=trained, num_atoms=sizes, seed=0, nfe=10, batch_size=6)
    for a, b, c in zip(mols, same, one_batch, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)  # a seed reproduces exactly
        # and the batch size does not matter (up to float32 summation order, which this barely
        # trained model amplifies: at t_max, alpha = 0.003 divides eps errors into x0)
        np.testing.assert_allclose(a.positions, c.positions, rtol=1e-2, atol=1e-2)
    drawn = sample_molecules(20, checkpoint=trained, seed=1, nfe=4, sampler="heun")
    support = set(json.loads((trained / "molecule.json").read_text())["num_atoms"]["sizes"])
    assert {len(m) for m in drawn} <= support



def test_export_generator_samples_like_the_run(trained, tmp_path):
    from sciddiff.molecules import export_generator
    from sciddiff.molecules._generate import sample_molecules

    out = export_generator(trained, tmp_path / "bundle", dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.json", "model.safetensors",
                                                      "molecule.json", "state.json"]
    a = sample_molecules(4, checkpoint=trained, num_atoms=6, seed=0, nfe=6)
    b = sample_molecules(4, checkpoint=out, num_atoms=6, seed=0, nfe=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.numbers, y.numbers)
        np.testing.assert_allclose(x.positions, y.positions, rtol=0, atol=1e-6)
    half = export_generator(trained, tmp_path / "half")
    assert (half / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    with pytest.raises(FileNotFoundError, match="molecule.json"):
        export_generator(tmp_path / "half" / "nowhere", tmp_path / "x")

E3NN_TINY = {"hidden_irreps": "8x0e + 2x0o + 2x1o + 2x1e", "layers": 1, "lmax": 1, "radial_hidden": 8}


@pytest.mark.parametrize("process, backbone", [("edm", "egnn"), ("flow", "egnn"), ("vp", "e3nn")])
def test_other_processes_train_and_sample(tiny_qm9, tmp_path, process, backbone):
    from sciddiff.molecules._generate import sample_molecules

    kw = {**TINY, "limit": 32, "backbone": backbone}
    if backbone == "e3nn":
        kw["backbone_kwargs"] = E3NN_TINY
    cfg = MoleculeTrainConfig(**kw, process=process, max_steps=6, log_every=3)
    train_molecules(cfg, tmp_path, progress=False, trainer_kwargs=QUIET)
    saved = MoleculeTrainConfig.from_json(tmp_path / "config.json")
    if process == "edm":  # sigma_data resolved from the data: RMS over the degrees of freedom
        assert saved.sigma_data is not None and 0.3 < saved.sigma_data < 2.0
    mols = sample_molecules(3, checkpoint=tmp_path, num_atoms=4, seed=0, nfe=4)
    assert [len(m) for m in mols] == [4, 4, 4] and all(np.isfinite(m.positions).all() for m in mols)


def test_resume_continues_the_step_count(tiny_qm9, tmp_path):
    small = {**TINY, "limit": 32, "log_every": 4, "checkpoint_every": 4}
    cfg = MoleculeTrainConfig(**small, max_steps=8)
    train_molecules(cfg, tmp_path, progress=False, trainer_kwargs=QUIET)
    assert load_checkpoint(tmp_path).global_step == 8
    longer = MoleculeTrainConfig(**small, max_steps=12)

    steps = []

    class Count(__import__("pytorch_lightning").Callback):
        def on_train_batch_end(self, trainer, module, *args):
            steps.append(module.step_count)

    train_molecules(longer, tmp_path, progress=False, trainer_kwargs={**QUIET, "callbacks": [Count()]})
    assert steps == [9, 10, 11, 12]  # only the remaining steps ran, counting on from the checkpoint
    assert load_checkpoint(tmp_path).global_step == 12
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["step"] for r in history] == [4, 8, 12]
    info = json.loads((tmp_path / "molecule.json").read_text())
    assert info["training"]["steps"] == 12 and info["training"]["wall_time_s"] >= history[1]["wall_time_s"]

    other = MoleculeTrainConfig(**{**small, "backbone_kwargs": {"hidden": 8, "layers": 2}}, max_steps=16)
    with pytest.raises(ValueError, match=r"cannot resume.*backbone_kwargs"):
        train_molecules(other, tmp_path, progress=False, trainer_kwargs=QUIET)


def test_dataset_items_are_views_of_the_split(tiny_qm9):
    split = tiny_qm9("train")
    ds = QM9Dataset(split, limit=10)
    assert len(ds) == 10 and torch.equal(ds.num_atoms(), split.num_atoms()[:10])
    z, pos = ds[3]
    ref = split.molecule(3)
    assert z.tolist() == ref.numbers.tolist()
    np.testing.assert_allclose(pos.numpy(), ref.positions, atol=1e-6)
    with pytest.raises(IndexError, match="out of range"):
        ds[10]
