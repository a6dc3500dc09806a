"""Subspace construction, algebra, persistence and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import (
    DegenerateDirectionsError,
    FileFormatError,
    GradrouteError,
    GradrouteWarning,
    HiddenSizeMismatchError,
    ModelMismatchError,
    SubspaceError,
    UnknownLayerError,
)
from gradroute.testing import tiny_lm


def _sub(d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return gr.Subspace.from_directions(
        {0: torch.randn(2, d, generator=g), 2: torch.randn(3, d, generator=g), "enc.0": torch.randn(1, d, generator=g)},
        names={0: ["toxic", "sycophant"], 2: ["a", "b", "c"], "enc.0": ["red"]},
    )


def test_from_directions_keeps_raw_directions_names_and_order():
    raw = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    sub = gr.Subspace.from_directions(raw, names=["first", "second"], layers=[1, 2])
    assert sub.layers == (1, 2)
    U = sub.basis(1)
    assert torch.allclose(U[:, 0], torch.tensor([0.6, 0.8, 0.0]))  # first column = first direction
    assert P.orthonormality_error(U) <= 1e-6
    assert torch.equal(sub.directions(2), raw)  # unnormalized, signed
    assert sub.names(1) == ("first", "second") and sub.rank(2) == 2 and sub.dim(1) == 3
    # a single vector at one layer; numpy input
    s1 = gr.Subspace.from_directions({5: np.array([0.0, -2.0, 0.0])})
    assert torch.allclose(s1.basis(5)[:, 0], torch.tensor([0.0, -1.0, 0.0]))


def test_mixed_keys_sorted_and_immutable():
    sub = _sub()
    assert sub.layers == (0, 2, "enc.0")
    U = sub.basis(0)
    U.zero_()
    assert sub.basis(0).abs().sum() > 0
    h = sub.content_hash
    sub.directions(2).zero_()
    assert sub.content_hash == h
    with pytest.raises(AttributeError):
        sub.foo = 1  # __slots__: no new attributes


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[float("nan"), 1.0, 0.0]]), "NaN"),
    (torch.tensor([[float("inf"), 1.0, 0.0]]), "NaN or Inf"),
    (torch.zeros(1, 3), "zero vector"),
    (torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]), "dependent"),
    (torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1e-6]]), "dependent"),
])
def test_degenerate_directions_are_reported(bad, match):
    with pytest.raises(DegenerateDirectionsError, match=match) as e:
        gr.Subspace.from_directions({0: bad})
    assert "Fix:" in str(e.value)


def test_degenerate_can_be_dropped_with_a_warning_never_silently():
    D = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with pytest.warns(GradrouteWarning, match="direction 1"):
        sub = gr.Subspace.from_directions({0: D}, names=["a", "a2", "b"], on_degenerate="warn")
    assert sub.names(0) == ("a", "b") and sub.rank(0) == 2
    assert torch.equal(sub.directions(0), D[[0, 2]])


def test_shape_and_key_errors():
    with pytest.raises(SubspaceError, match="layers="):
        gr.Subspace.from_directions(torch.randn(2, 4))
    with pytest.raises(SubspaceError, match="names"):
        gr.Subspace.from_directions({0: torch.randn(2, 4)}, names=["one"])
    with pytest.raises(UnknownLayerError):
        gr.Subspace.from_directions({-3: torch.randn(1, 4)})
    with pytest.raises(HiddenSizeMismatchError, match="hidden size is 8"):
        gr.Subspace.from_directions({0: torch.randn(1, 4)}, hidden_size=8)
    sub = _sub()
    with pytest.raises(UnknownLayerError, match="has no layer 7"):
        sub.basis(7)


def test_model_checks():
    model, _ = tiny_lm("llama")  # 4 blocks, d = 64
    with pytest.raises(HiddenSizeMismatchError, match="hidden size is 64"):
        gr.Subspace.from_directions({1: torch.randn(1, 32)}, model=model)
    with pytest.raises(UnknownLayerError, match="0..3"):
        gr.Subspace.from_directions({4: torch.randn(1, 64)}, model=model)
    good = gr.Subspace.from_directions({3: torch.randn(1, 64)}, model=model)
    assert good.provenance.model == "gradroute-tiny-llama"
    other, _ = tiny_lm("gpt2", hidden_size=32)
    with pytest.raises(ModelMismatchError, match="hidden size is 32"):
        good.validate_for(other)
    with pytest.raises(UnknownLayerError, match="no module named"):
        _sub(d=64).restrict(["enc.0"]).validate_for(model)


def test_projection_methods_delegate_to_the_core():
    sub = _sub()
    h = torch.randn(5, 16)
    U = sub.basis(2)
    assert torch.allclose(sub.project(h, 2), P.project(h, U))
    assert torch.allclose(sub.remove(h, 2), P.remove(h, U))
    assert torch.allclose(sub.coords(h, 2), h @ U)
    assert torch.allclose(sub.energy_fraction(h, 2), (h @ U).pow(2).sum(1) / h.pow(2).sum(1))


def test_union_restrict_random_like():
    a = _sub(seed=0)
    g = torch.Generator().manual_seed(99)
    b = gr.Subspace.from_directions({0: torch.cat([a.basis(0)[:, :1].T, torch.randn(1, 16, generator=g)]),
                                     9: torch.randn(2, 16, generator=g)},
                                    names=["toxic", "new"])  # shares one direction with a
    u = a.union(b)
    assert u.rank(0) == 3  # 2 + 2 minus the shared one
    assert P.orthonormality_error(u.basis(0)) <= 1e-6
    assert u.rank(9) == 2 and u.rank(2) == 3
    assert u.provenance.parents == (a.content_hash, b.content_hash)
    assert P.overlap(a.basis(0), u.basis(0)) == pytest.approx(1.0, abs=1e-6)  # a ⊂ a ∪ b
    r = a.restrict([2])
    assert r.layers == (2,) and torch.equal(r.basis(2), a.basis(2))
    ctl = a.random_like(seed=3)
    assert ctl.layers == a.layers and all(ctl.rank(L) == a.rank(L) for L in a.layers)
    assert all(P.orthonormality_error(ctl.basis(L)) <= 1e-6 for L in a.layers)
    assert ctl == a.random_like(seed=3) and ctl != a.random_like(seed=4)
    assert ctl.provenance.source == "random" and ctl.provenance.extra["seed"] == 3
    angles = a.principal_angles(a, 0)
    assert torch.allclose(angles, torch.zeros(2), atol=1e-3)


def test_principal_angles_units_are_stated(tmp_path, capsys):
    import math

    from gradroute.cli import main

    c, s = math.cos(math.radians(60)), math.sin(math.radians(60))
    a = gr.Subspace.from_directions({0: torch.tensor([1.0, 0.0, 0.0])})
    b = gr.Subspace.from_directions({0: torch.tensor([c, s, 0.0])})
    assert a.principal_angles(b, 0).item() == pytest.approx(math.pi / 3, abs=1e-4)  # radians by default
    assert a.principal_angles(b, 0, degrees=True).item() == pytest.approx(60.0, abs=1e-3)
    a.save(tmp_path / "a"), b.save(tmp_path / "b")
    capsys.readouterr()
    assert main(["subspace", "inspect", str(tmp_path / "a"), "--compare", str(tmp_path / "b")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "layer 0: overlap" in x)
    assert "principal angles (degrees" in line and line.endswith("[60.0]"), line
    assert main(["subspace", "inspect", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["principal_angles_degrees"]["0"] == [pytest.approx(60.0, abs=1e-3)]


def test_save_load_roundtrip(tmp_path):
    sub = _sub()
    sub.save(tmp_path / "p.subspace")
    back = gr.Subspace.load(tmp_path / "p.subspace")
    assert back == sub and back.layers == sub.layers
    for L in sub.layers:
        assert torch.equal(back.basis(L), sub.basis(L))
        assert torch.equal(back.directions(L), sub.directions(L))
        assert back.names(L) == sub.names(L)
    assert back.provenance == sub.provenance


def test_tampered_or_corrupt_files_are_refused(tmp_path):
    sub = _sub()
    path = sub.save(tmp_path / "p.subspace")
    meta_path = path / "subspace.json"
    meta = json.loads(meta_path.read_text())
    # tamper: rename a direction in the sidecar
    meta["names"]["L0"] = ["honest", "sycophant"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="modified"):
        gr.Subspace.load(path)
    # tamper: flip bytes in the tensor file
    path = sub.save(tmp_path / "q.subspace")
    data = bytearray((path / "subspace.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "subspace.safetensors").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="tensor checksum"):
        gr.Subspace.load(path)
    # garbage JSON, missing directory
    path = sub.save(tmp_path / "r.subspace")
    (path / "subspace.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        gr.Subspace.load(path)
    with pytest.raises(FileFormatError, match="not a subspace directory"):
        gr.Subspace.load(tmp_path / "missing")


def test_persona_vectors_import_is_off_by_one(tmp_path):
    n, d = 4, 8
    T = torch.randn(n + 1, d)  # [n_layers + 1, d], indexed like hidden_states
    torch.save(T, tmp_path / "trait.pt")
    sub = gr.Subspace.from_persona_vectors(tmp_path / "trait.pt", name="evil")
    # the last row is hidden_states[-1] (after the final norm): not a block output, never imported
    assert sub.layers == (-1, 0, 1, 2)
    for L in sub.layers:
        assert torch.equal(sub.directions(L)[0], T[L + 1])  # our layer L = their index L + 1
    assert sub.provenance.source == "persona_vectors"
    only = gr.Subspace.from_persona_vectors(T, layers=[-1, 2])
    assert torch.equal(only.directions(-1)[0], T[0])
    with pytest.raises(UnknownLayerError, match="final norm"):
        gr.Subspace.from_persona_vectors(T, layers=[3])
    with pytest.raises(UnknownLayerError, match="-1..2"):
        gr.Subspace.from_persona_vectors(T, layers=[7])


def test_assistant_axis_import_is_not_off_by_one(tmp_path):
    T = torch.randn(4, 8)  # [n_layers, d], indexed by block output
    torch.save({"axis": T, "meta_step": torch.tensor(3)}, tmp_path / "axis.pt")
    sub = gr.Subspace.from_assistant_axis(tmp_path / "axis.pt", layers=[1, 3])
    assert torch.equal(sub.directions(1)[0], T[1]) and torch.equal(sub.directions(3)[0], T[3])


def test_plain_file_imports(tmp_path):
    A = torch.randn(2, 8)
    np.save(tmp_path / "dirs.npy", A.numpy())
    sub = gr.Subspace.from_file(tmp_path / "dirs.npy", layers=[2], names=["x", "y"])
    assert torch.allclose(sub.directions(2), A)
    with pytest.raises(SubspaceError, match="layers="):
        gr.Subspace.from_file(tmp_path / "dirs.npy")
    from safetensors.torch import save_file

    save_file({"layer.1": torch.randn(1, 8), "layer.3": torch.randn(2, 8)}, str(tmp_path / "d.safetensors"))
    s2 = gr.Subspace.from_file(tmp_path / "d.safetensors")
    assert s2.layers == (1, 3) and s2.rank(3) == 2
    # pickled objects are never executed
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(FileFormatError, match="weights_only"):
        gr.Subspace.from_file(tmp_path / "evil.pt", layers=[0])


def test_select_directions_by_name_or_index():
    sub = _sub()
    assert torch.equal(sub.select(0, "sycophant"), sub.basis(0)[:, [1]])
    assert torch.equal(sub.select(2, [2, "a"]), sub.basis(2)[:, [2, 0]])
    with pytest.raises(UnknownLayerError, match="no direction named 'evil'"):
        sub.select(0, "evil")
    with pytest.raises(UnknownLayerError, match="out of range"):
        sub.select(0, 5)


def test_all_errors_are_gradroute_errors_with_fixes():
    import gradroute.errors as E

    for name in E.__all__:
        cls = getattr(E, name)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls is not E.GradrouteWarning:
            assert issubclass(cls, GradrouteError), name
