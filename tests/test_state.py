"""router.state: the router's state file (router.json + router_state.safetensors + subspace/).

Round trip: what is saved is exactly the routes' coordinate blocks (ref0, adapter, per-env
shares) and the metadata naming the plan, subspace, mode and environments; loading it into a
router built the same way restores them bit for bit. Damaged, missing or mismatched files raise
typed errors (FileFormatError / AdapterError) that say what to do.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gradroute as gr
from gradroute.errors import AdapterError, FileFormatError, GradrouteError, GradrouteWarning
from gradroute.router import state as S
from gradroute.router.envs import UNATTRIBUTED
from gradroute.testing import tiny_lm

STEPS = 3


def _sub(seed=0):
    g = torch.Generator().manual_seed(seed)
    return gr.Subspace.from_directions({L: torch.randn(2, 64, generator=g) for L in (1, 2)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A router trained 3 steps (the first un-split, then two split steps) and its saved state."""
    torch.manual_seed(0)
    model, _ = tiny_lm("llama")
    sub = _sub()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router = gr.GradientRouter(model, sub, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    for i in range(STEPS):
        x = torch.randint(3, 100, (2, 8), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step(env_weights=None if i == 0 else {"a": 0.25 * i, "b": 1 - 0.25 * i})
        opt.zero_grad()
    path = router.save_state(tmp_path_factory.mktemp("state") / "gradroute")
    return model, sub, router, path


def _copy(path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(path, tmp_path / "copy"))


def _blocks(router):
    return {(r.name, i): b for r in router.routes_state for i, b in enumerate(r.blocks)}


def _fresh(model, sub, **kw):
    return gr.GradientRouter(model, sub, **kw)


# ------------------------------------------------------------------------------ the files
def test_saved_files_and_metadata(saved):
    _, sub, router, path = saved
    assert {p.name for p in path.iterdir()} == {S.STATE_FILE, S.STATE_META, "subspace"}
    meta = json.loads((path / S.STATE_META).read_text())
    assert meta == S.read_meta(path)
    assert meta["format"] == S.STATE_FORMAT and meta["format_version"] == 2
    assert meta["mode"] == router.mode == "update"
    assert meta["steps"] == router.steps == STEPS
    assert meta["plan_fingerprint"] == router.plan.fingerprint()
    assert meta["subspace_hash"] == sub.content_hash
    assert meta["modules"] == router.plan.modules
    assert meta["targets"] == [[t.module, t.layer, t.side] for t in router.plan]
    assert meta["route_bias"] is False
    assert meta["envs"] == router.envs == [UNATTRIBUTED, "a", "b"]
    assert meta["env_vocab"] == ["a", "b"]
    assert meta["tensor_sha256"] == hashlib.sha256((path / S.STATE_FILE).read_bytes()).hexdigest()
    assert gr.Subspace.load(path / "subspace") == sub


def test_tensors_are_the_coordinate_blocks(saved):
    _, _, router, path = saved
    tensors = load_file(str(path / S.STATE_FILE))
    expected = set()
    for (name, i), b in _blocks(router).items():
        assert torch.equal(tensors[f"ref0.{i}.{name}"], b.ref0)
        assert torch.equal(tensors[f"adapter.{i}.{name}"], b.adapter)
        expected |= {f"ref0.{i}.{name}", f"adapter.{i}.{name}"}
        for j, env in enumerate(router.envs):
            assert torch.equal(tensors[f"env.{j}.{i}.{name}"], b.env[env])
            expected.add(f"env.{j}.{i}.{name}")
        assert b.adapter.abs().max() > 0  # the run routed something into every module
    assert expected <= set(tensors)
    assert {k for k in tensors if not k.startswith(("mode.", "attr."))} == expected


# ------------------------------------------------------------------------------ round trip
def _assert_same_state(a, b):
    assert a.steps == b.steps and a.envs == b.envs
    assert a.environments.names == b.environments.names
    assert a.environments.unattributed == b.environments.unattributed
    ba, bb = _blocks(a), _blocks(b)
    assert ba.keys() == bb.keys()
    for k in ba:
        assert torch.equal(ba[k].ref0, bb[k].ref0) and torch.equal(ba[k].adapter, bb[k].adapter)
        assert ba[k].env.keys() == bb[k].env.keys()
        assert all(torch.equal(ba[k].env[e], bb[k].env[e]) for e in ba[k].env)


def test_load_restores_the_state_exactly(saved):
    model, sub, router, path = saved
    fresh = _fresh(model, sub)
    assert fresh.steps == 0 and fresh.envs == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradrouteWarning)  # the weights match: no re-sync warning
        fresh.load_state(path)
    _assert_same_state(fresh, router)
    for m in router.plan.modules:
        for env in (None, *router.envs):
            assert torch.equal(fresh.adapter_coords(m, env), router.adapter_coords(m, env))


def test_from_state_and_in_memory_state_dict(saved):
    model, sub, router, path = saved
    _assert_same_state(gr.GradientRouter.from_state(model, path), router)
    tensors, meta = S.state_dict(router)
    again = _fresh(model, sub)
    S.load_state_dict(again, tensors, meta)
    _assert_same_state(again, router)


def test_saving_again_into_the_same_directory(saved, tmp_path):
    _, _, router, path = saved
    copy_ = _copy(path, tmp_path)
    before = (copy_ / "subspace" / "subspace.safetensors").read_bytes()
    router.save_state(copy_)  # a checkpoint re-saved in place: the subspace is kept, not refused
    assert (copy_ / "subspace" / "subspace.safetensors").read_bytes() == before
    assert S.read_meta(copy_)["tensor_sha256"] == S.read_meta(path)["tensor_sha256"]


def test_weights_that_do_not_match_are_resynced_with_a_warning(saved):
    model, sub, router, path = saved
    other = copy.deepcopy(model)
    W = other.get_submodule(router.plan.modules[0]).weight
    with torch.no_grad():
        W.add_(0.5 * router.basis(router.plan.modules[0]).float() @ torch.ones(2, W.shape[1]))  # in-subspace edit
    fresh = _fresh(other, sub)
    with pytest.warns(GradrouteWarning, match="do not match the loaded router state"):
        fresh.load_state(path)
    for r in fresh.routes_state:
        for b in r.blocks:
            # update mode: the weights hold ref0 + adapter in span(U); the difference went to the base
            assert torch.allclose(b.ref0 + b.adapter, b.coords(), rtol=0, atol=1e-12)
    assert torch.equal(fresh.adapter_coords(router.plan.modules[0]), router.adapter_coords(router.plan.modules[0]))


# ------------------------------------------------------------------------------ damage
def _flip_byte(p: Path) -> None:
    data = bytearray((p / S.STATE_FILE).read_bytes())
    data[-1] ^= 0x01
    (p / S.STATE_FILE).write_bytes(bytes(data))


def _edit_meta(**changes):
    def edit(p: Path) -> None:
        meta = json.loads((p / S.STATE_META).read_text())
        meta.update(changes)
        (p / S.STATE_META).write_text(json.dumps(meta))
    return edit


def _drop_tensor(p: Path) -> None:
    """A tensor file without one module's adapter, its checksum made to match."""
    tensors = load_file(str(p / S.STATE_FILE))
    del tensors[next(k for k in tensors if k.startswith("adapter.0."))]
    save_file(tensors, str(p / S.STATE_FILE))
    _edit_meta(tensor_sha256=hashlib.sha256((p / S.STATE_FILE).read_bytes()).hexdigest())(p)


DAMAGE = [
    ("tensor_bytes_changed", _flip_byte, FileFormatError, "does not match"),
    ("tensor_file_missing", lambda p: (p / S.STATE_FILE).unlink(), FileFormatError, S.STATE_FILE),
    ("meta_missing", lambda p: (p / S.STATE_META).unlink(), FileFormatError, S.STATE_META),
    ("meta_not_json", lambda p: (p / S.STATE_META).write_text("{not json"), FileFormatError, "not valid JSON"),
    ("meta_checksum_changed", _edit_meta(tensor_sha256="0" * 64), FileFormatError, "does not match"),
    ("format_changed", _edit_meta(format="something.else"), AdapterError, "not a gradroute router state"),
    ("plan_changed", _edit_meta(plan_fingerprint="0" * 16), AdapterError, "another routing plan"),
    ("subspace_changed", _edit_meta(subspace_hash="0" * 64), AdapterError, "another routing plan or subspace"),
    ("mode_changed", _edit_meta(mode="gradient"), AdapterError, "mode='gradient'"),
    ("tensor_missing", _drop_tensor, FileFormatError, "lacks tensor 'adapter.0."),
]


@pytest.mark.parametrize("name,damage,err,needle", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_state_raises_a_typed_error(saved, tmp_path, name, damage, err, needle):
    model, sub, _, path = saved
    p = _copy(path, tmp_path)
    damage(p)
    with pytest.raises(err) as e:
        _fresh(model, sub).load_state(p)
    msg = str(e.value)
    assert isinstance(e.value, GradrouteError) and needle in msg
    assert msg.split(" Fix: ", 1)[1].strip()


def test_a_directory_that_is_not_a_state_is_refused(saved, tmp_path):
    model, sub, _, path = saved
    with pytest.raises(FileFormatError):
        _fresh(model, sub).load_state(tmp_path)  # empty directory
    p = _copy(path, tmp_path)
    _edit_meta(mode="sideways")(p)
    with pytest.raises(FileFormatError, match="no valid mode/targets"):
        gr.GradientRouter.from_state(model, p)


def test_a_sidecar_that_is_not_an_object_is_a_file_format_error(saved, tmp_path):
    model, sub, _, path = saved
    p = _copy(path, tmp_path)
    (p / S.STATE_META).write_text("[]")
    with pytest.raises(FileFormatError):
        _fresh(model, sub).load_state(p)
