"""gradroute.distributed in one process: without a process group (the no-op path) and inside a
one-process gloo group initialised here (the collective path)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from gradroute import distributed as gd


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(2, 2, generator=g).to(torch.bfloat16),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.tensor(2.5),  # 0-d
    ]


def _check_copies(inputs, outputs):
    assert len(outputs) == len(inputs)
    for t, o in zip(inputs, outputs):
        assert o.shape == t.shape and o.dtype == t.dtype and o.device == t.device
        assert torch.equal(o, t)  # summed over one rank: the same values
        assert o.data_ptr() != t.data_ptr()  # new tensors, inputs untouched


@pytest.fixture
def no_group():
    assert not (dist.is_available() and dist.is_initialized()), "a process group leaked from another test"


def test_single_process_without_a_group(no_group):
    assert gd.world_size() == 1 and gd.rank() == 0 and gd.is_main_process()
    inputs = _tensors()
    snapshot = [t.clone() for t in inputs]
    out = gd.all_reduce_sum(inputs)
    _check_copies(inputs, out)
    assert all(torch.equal(a, b) for a, b in zip(inputs, snapshot))
    out[0].add_(1.0)  # writing to the result leaves the input alone
    assert torch.equal(inputs[0], snapshot[0])
    assert gd.all_reduce_sum([]) == []


def test_torch_without_distributed_support(no_group, monkeypatch):
    monkeypatch.setattr(dist, "is_available", lambda: False)
    assert gd.world_size() == 1 and gd.rank() == 0 and gd.is_main_process()
    t = torch.ones(3)
    (o,) = gd.all_reduce_sum([t])
    assert torch.equal(o, t) and o.data_ptr() != t.data_ptr()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group(no_group):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


def test_one_process_gloo_group(gloo_group):
    assert dist.is_initialized()
    assert gd.world_size() == 1 and gd.rank() == 0 and gd.is_main_process()
    inputs = _tensors()
    _check_copies(inputs, gd.all_reduce_sum(inputs))


def test_packed_collective_round_trips_shapes_and_dtypes(gloo_group, monkeypatch):
    """The packed path (one float64 buffer, one all_reduce) as it runs with several ranks: over a
    one-rank gloo group the sum is the identity, so every tensor must come back as it went in."""
    calls = []
    real = dist.all_reduce

    def counting(t, *a, **kw):
        calls.append((t.dtype, t.numel(), t.device))
        return real(t, *a, **kw)

    monkeypatch.setattr(gd, "world_size", lambda: 2)  # take the collective path
    monkeypatch.setattr(dist, "all_reduce", counting)
    inputs = _tensors()
    snapshot = [t.clone() for t in inputs]
    out = gd.all_reduce_sum(inputs)
    assert calls == [(torch.float64, sum(t.numel() for t in inputs), torch.device("cpu"))]  # one collective
    _check_copies(inputs, out)
    assert all(torch.equal(a, b) for a, b in zip(inputs, snapshot))
    grad = torch.randn(4, 3, requires_grad=True)
    (o,) = gd.all_reduce_sum([grad])  # tensors that need grad are read, not tracked
    assert not o.requires_grad and torch.equal(o, grad.detach())


def test_is_main_process_follows_the_rank(monkeypatch):
    monkeypatch.setattr(gd, "rank", lambda: 1)
    assert not gd.is_main_process()
    monkeypatch.setattr(gd, "rank", lambda: 0)
    assert gd.is_main_process()
