"""Checkpoint state without pickle: round trips of real optimizer, schedule, EMA and RNG state
through safetensors + JSON, and no unpickling load of storage content anywhere in the code."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rayimg.train.checkpoint import load_state, save_state
from rayimg.train.loop import rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]


def assert_same(a, b, path="/"):
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}{k}/")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}{i}/")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def trained_optimizer_and_schedule():
    from diffusers.optimization import get_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 3e-3}], lr=1e-3)
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_optimizer_schedule_rng_and_odd_values_round_trip_exactly(tmp_path):
    _model, opt, sched = trained_optimizer_and_schedule()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    odd = {1: torch.zeros(0), "nested": [(1, 2.5, None), {"x": float("inf")}], "scalar": torch.tensor(7.0),
           "same": [torch.ones(3)] * 2, "a/b": torch.ones(1), "a": {"b": torch.zeros(1)}, "nan": float("nan")}
    for name, state in [("optimizer", opt.state_dict()), ("lr_scheduler", sched.state_dict()),
                        ("rng", rng_state()), ("odd", odd)]:
        save_state(tmp_path, name, state)
        assert_same(state, load_state(tmp_path, name))
    assert not (tmp_path / "lr_scheduler.safetensors").exists()  # no tensors, JSON only
    doc = json.loads((tmp_path / "optimizer.json").read_text())
    assert doc["tensors"] == "optimizer.safetensors"


def test_a_loaded_state_continues_like_the_original(tmp_path):
    model, opt, sched = trained_optimizer_and_schedule()
    save_state(tmp_path, "optimizer", opt.state_dict())
    save_state(tmp_path, "lr_scheduler", sched.state_dict())
    save_state(tmp_path, "rng", rng_state())
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def steps(model, opt, sched):
        out = []
        for _ in range(3):
            x = torch.randn(5, 4)
            model(x).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            out.append((random.random(), float(np.random.rand()), sched.get_last_lr()))
        return out, [p.detach().clone() for p in model.parameters()]

    expected = steps(model, opt, sched)
    torch.manual_seed(99)
    random.seed(99)
    model2, opt2, sched2 = trained_optimizer_and_schedule()
    model2.load_state_dict(weights)
    opt2.load_state_dict(load_state(tmp_path, "optimizer"))
    sched2.load_state_dict(load_state(tmp_path, "lr_scheduler"))
    set_rng_state(load_state(tmp_path, "rng"))
    got = steps(model2, opt2, sched2)
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1]):
        assert torch.equal(a, b)


def test_ema_state_round_trips(tmp_path):
    from diffusers.training_utils import EMAModel

    params = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(2)]
    ema = EMAModel(params, decay=0.9)
    ema.step(params)
    save_state(tmp_path, "ema", ema.state_dict())
    assert_same(ema.state_dict(), load_state(tmp_path, "ema"))


def test_what_json_cannot_hold_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="/opt/fn"):
        save_state(tmp_path, "bad", {"opt": {"fn": lambda: 0}})


def test_a_pickled_checkpoint_is_refused_not_loaded(tmp_path):
    torch.save({"x": 1}, tmp_path / "optimizer.pt")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        load_state(tmp_path, "optimizer")


UNPICKLING = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|torch\.load\((?![^)]*weights_only\s*=\s*True)")


def unpickling_loads(base: Path = ROOT, roots=("rayimg", "serving", "jobs")) -> list[str]:
    """Lines that unpickle: torch.load without weights_only=True, weights_only=False, pickle.load(s)."""
    hits = []
    for root in roots:
        for path in sorted((base / root).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if UNPICKLING.search(line):
                    hits.append(f"{path.relative_to(base)}:{n}: {line.strip()}")
    return hits


def test_no_code_unpickles_what_it_reads():
    assert unpickling_loads() == []


def test_the_unpickling_check_finds_each_form(tmp_path):
    (tmp_path / "rayimg").mkdir()
    (tmp_path / "rayimg" / "m.py").write_text(
        "a = torch.load(p, map_location='cpu')\nb = torch.load(p, weights_only=False)\nc = pickle.loads(x)\n"
        "d = torch.load(p, map_location='cpu', weights_only=True)\n")
    assert [h.split(":")[1] for h in unpickling_loads(tmp_path, ("rayimg",))] == ["1", "2", "3"]


class _RunsCode:
    """A pickle that, when unpickled, creates a file: what a tampered checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path):
    import pickle
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from rayimg.run.train import _weights_only_checkpoint_engine

    engine = _weights_only_checkpoint_engine(SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), _config=None))
    torch.save({"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(4.0)}, tmp_path / "states.pt")
    loaded = engine.load(str(tmp_path / "states.pt"), map_location=lambda storage, loc: storage)
    assert torch.equal(loaded["module"]["w"], torch.ones(2)) and loaded["loss_scaler"].cur_scale == 4.0
    torch.save({"module": _RunsCode(tmp_path / "ran")}, tmp_path / "tampered.pt")
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(tmp_path / "tampered.pt"))
    assert not (tmp_path / "ran").exists()
