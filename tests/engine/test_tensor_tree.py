"""State trees: exact round trip of everything a trainer checkpoints, and refusal of anything forged."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from adapt_engine.errors import AdaptEngineError
from adapt_engine.tensor_tree import TreeFormatError, load_tree, save_tree


def _optimizer_state():
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, betas=(0.8, 0.9))
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    return lin, opt


def test_round_trip_is_exact_and_keeps_types(tmp_path):
    random.seed(3)
    np.random.seed(4)
    _, opt = _optimizer_state()
    state = {
        "optimizer": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(), "bf16": torch.randn(5).bfloat16(), "view": torch.arange(10)[2:7:2],
        "empty": torch.zeros(0, 3), "floats": [float("nan"), float("inf"), -0.0, 5e-324, 0.1],
        "np_scalar": np.float64(1.5), 7: "int key", (1, "a"): None, "flag": False, "nested": ({"x": [1, (2,)]},),
    }
    save_tree(state, tmp_path / "s")
    back = load_tree(tmp_path / "s")
    assert back.keys() == state.keys()
    assert type(back["python"]) is tuple and type(back["python"][1]) is tuple
    assert back["python"] == state["python"]
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["numpy"], state["numpy"]))
    for key in ("torch", "bf16", "view", "empty"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])
    assert math.isnan(back["floats"][0]) and back["floats"][1:] == state["floats"][1:]
    assert math.copysign(1.0, back["floats"][2]) == -1.0
    assert type(back["np_scalar"]) is np.float64 and back["np_scalar"] == 1.5
    assert back["nested"] == ({"x": [1, (2,)]},) and back[7] == "int key"
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert list(back["optimizer"]["state"]) == [0, 1]
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    # the restored RNG states continue the same streams
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    a = (random.random(), np.random.rand())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    assert a == (random.random(), np.random.rand())


def test_restored_optimizer_steps_like_the_original(tmp_path):
    lin, opt = _optimizer_state()
    save_tree(opt.state_dict(), tmp_path / "o")
    lin2 = torch.nn.Linear(4, 3)
    lin2.load_state_dict(lin.state_dict())
    opt2 = torch.optim.AdamW(lin2.parameters(), lr=1e-3, betas=(0.8, 0.9))
    opt2.load_state_dict(load_tree(tmp_path / "o"))
    x = torch.randn(2, 4)
    for model, o in ((lin, opt), (lin2, opt2)):
        o.zero_grad()
        model(x).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(lin.parameters(), lin2.parameters()))


def test_unsupported_objects_are_refused_on_save(tmp_path):
    with pytest.raises(TypeError, match="cannot save a object"):
        save_tree({"x": object()}, tmp_path / "s")
    with pytest.raises(TypeError, match="object array"):
        save_tree({"x": np.array([None, 1], dtype=object)}, tmp_path / "s")


@pytest.mark.parametrize("tree", [
    {"__reduce__": "os.system"},
    {"ndarray": ["t0", "|O", [1]]},
    {"tensor": "t99"},
    {"dict": [[{"list": [1]}, 2]]},
    {"float": "not-hex"},
    {"set": [1, 2]},
])
def test_forged_trees_are_clear_errors(tmp_path, tree):
    save_tree({"ok": torch.zeros(2, dtype=torch.uint8)}, tmp_path / "s")
    (tmp_path / "s.json").write_text(json.dumps({"format": 1, "tree": tree}))
    with pytest.raises(TreeFormatError) as info:
        load_tree(tmp_path / "s")
    assert isinstance(info.value, AdaptEngineError)


def test_truncated_tensor_file_is_a_clear_error(tmp_path):
    save_tree({"t": torch.randn(100)}, tmp_path / "s")
    f = tmp_path / "s.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(TreeFormatError, match="cannot be read"):
        load_tree(tmp_path / "s")


def test_deeply_nested_forgery_is_a_clear_error(tmp_path):
    save_tree({"ok": 1}, tmp_path / "s")
    deep = '{"list": [' * 100_000 + "1" + "]}" * 100_000
    (tmp_path / "s.json").write_text('{"format": 1, "tree": ' + deep + "}")
    with pytest.raises(TreeFormatError):
        load_tree(tmp_path / "s")
