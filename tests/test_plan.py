"""build_plan / RoutingPlan: which modules are routed, on which side, with which basis and axis.

Expectations come from the layer convention (writers of block L use layer L, readers of block L
use layer L - 1, the embedding writes layer -1), from each architecture's module names, and
from the dataflow itself: perturbing a writer's weight inside span(U) along the planned axis
must move the module's output only inside span(U); a reader must not see inputs orthogonal to
its span.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import (
    ConfigError,
    GradrouteError,
    GradrouteWarning,
    HiddenSizeMismatchError,
    NoTargetError,
    RoutingError,
    UnknownLayerError,
    UnsupportedModuleError,
)
from gradroute.layers import reader_layer, writer_layer
from gradroute.plan import RouteTarget, RoutingPlan, build_plan
from gradroute.testing import tiny_lm

D, N_BLOCKS = 64, 4  # the tiny models' hidden size and depth

WRITERS = {
    "llama": ("model.layers.{b}.self_attn.o_proj", "model.layers.{b}.mlp.down_proj"),
    "gpt2": ("transformer.h.{b}.attn.c_proj", "transformer.h.{b}.mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.{b}.attention.dense", "gpt_neox.layers.{b}.mlp.dense_4h_to_h"),
}
READERS = {
    "llama": ("model.layers.{b}.self_attn.q_proj", "model.layers.{b}.self_attn.k_proj",
              "model.layers.{b}.self_attn.v_proj", "model.layers.{b}.mlp.gate_proj", "model.layers.{b}.mlp.up_proj"),
    "gpt2": ("transformer.h.{b}.attn.c_attn", "transformer.h.{b}.mlp.c_fc"),
    "gpt_neox": ("gpt_neox.layers.{b}.attention.query_key_value", "gpt_neox.layers.{b}.mlp.dense_h_to_4h"),
}


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_lm(arch)[0] for arch in ("llama", "gpt2", "gpt_neox")}


def _sub(layers, k=2, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return gr.Subspace.from_directions({L: torch.randn(k, d, generator=g) for L in layers})


def _names(table, arch, blocks):
    return {n.format(b=b) for b in blocks for n in table[arch]}


# ------------------------------------------------------------------------------ default targets
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_write_side_routes_the_writers_of_the_blocks_that_have_a_basis(models, arch):
    model = models[arch]
    sub = _sub([1, 2], k=3)
    plan = build_plan(model, sub, side="write")
    assert set(plan.modules) == _names(WRITERS, arch, [1, 2])
    mods = dict(model.named_modules())
    for t in plan:
        assert t.side == "write" and t.layer == writer_layer(t.block) == t.block
        assert t.rank == sub.rank(t.layer) == 3
        W = mods[t.module].weight
        assert t.weight_shape == tuple(W.shape)
        assert W.shape[t.axis] == D  # the residual axis
        assert t.kind == ("conv1d" if arch == "gpt2" else "linear")
        assert t.axis == (1 if arch == "gpt2" else 0)  # Conv1D stores the weight transposed
    assert plan.layers == [1, 2]
    assert plan.subspace_hash == sub.content_hash


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_read_side_uses_the_previous_layers_basis(models, arch):
    model = models[arch]
    sub = _sub([1, 2])
    plan = build_plan(model, sub, side="read")
    # readers of block b read resid_pre b = layer b - 1: layers 1, 2 feed blocks 2, 3
    assert set(plan.modules) == _names(READERS, arch, [2, 3])
    for t in plan:
        assert t.side == "read" and t.layer == reader_layer(t.block) == t.block - 1
        assert t.axis == (0 if arch == "gpt2" else 1)
        assert t.weight_shape[t.axis] == D
        assert not t.bias  # biases are routed on writers only


def test_both_sides_is_the_union_without_duplicates(models):
    model = models["llama"]
    sub = _sub([1, 2])
    write = build_plan(model, sub, side="write")
    read = build_plan(model, sub, side="read")
    both = build_plan(model, sub, side="both")
    assert sorted(both.modules) == sorted(write.modules + read.modules)
    assert len(set(both.modules)) == len(both)
    assert {(t.module, t.layer, t.side) for t in both} == {(t.module, t.layer, t.side) for t in [*write, *read]}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_planned_axis_is_where_the_weight_meets_the_residual_stream(models, arch):
    """A writer's weight moved by U C along the planned axis moves its output by a vector in
    span(U) only; a reader's weight moved by V C along its axis does not see inputs ⟂ span(V)."""
    model = models[arch]
    sub = _sub([0, 1, 2], k=2)
    U = sub.basis(1)
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(1)
    checked = 0
    for side in ("write", "read"):
        for t in build_plan(model, sub, side=side):
            if t.layer != 1:
                continue
            checked += 1
            mod = mods[t.module]
            W = mod.weight
            shape = list(W.shape)
            shape[t.axis] = U.shape[1]
            C = torch.randn(*shape, generator=g)
            dW = P.lift(C, U, t.axis)
            x = torch.randn(5, mod.weight.shape[1 - t.axis] if side == "write" else D, generator=g)
            if side == "read":
                x = P.remove(x, U)  # inputs orthogonal to the span the reader is split along
            with torch.no_grad():
                y0 = mod(x)
                W.add_(dW)
                y1 = mod(x)
                W.sub_(dW)
            diff = (y1 - y0).double()
            if side == "write":
                assert diff.norm() > 1e-3
                assert P.remove(diff, U.double()).norm() <= 1e-5 * diff.norm()
            else:
                assert diff.abs().max() <= 1e-5
    assert checked == len(WRITERS[arch]) + len(READERS[arch])


# ------------------------------------------------------------------------------ embeddings
def test_embeddings_route_the_input_embedding_with_layer_minus_one(models):
    model = models["llama"]
    sub = _sub([-1, 1])
    with pytest.raises(NoTargetError, match="embeddings=True"):
        build_plan(model, sub)  # layer -1 has a basis but no block writes it
    plan = build_plan(model, sub, embeddings=True)
    emb = plan["model.embed_tokens"]
    assert (emb.side, emb.kind, emb.layer, emb.block) == ("embed", "embedding", -1, None)
    assert emb.weight_shape == tuple(model.get_input_embeddings().weight.shape)
    assert emb.weight_shape[emb.axis] == D and emb.axis == 1
    assert set(plan.modules) == {"model.embed_tokens"} | _names(WRITERS, "llama", [1])


def test_embeddings_need_a_basis_for_layer_minus_one_or_spread(models):
    model = models["llama"]
    sub = _sub([0])
    with pytest.raises(NoTargetError) as e:
        build_plan(model, sub, embeddings=True)
    assert "spread=1" in str(e.value)
    plan = build_plan(model, sub, embeddings=True, spread=1)
    assert plan["model.embed_tokens"].layer == 0  # the nearest basis covers it


def test_tied_embeddings_are_refused(models):
    model = models["gpt2"]  # GPT-2 ties wte to lm_head
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    with pytest.raises(RoutingError) as e:
        build_plan(model, _sub([-1, 1]), embeddings=True)
    assert "tied" in str(e.value) and "untie" in str(e.value)


# ------------------------------------------------------------------------------ spread
def test_spread_lets_the_nearest_basis_cover_neighbouring_blocks(models):
    model = models["llama"]
    only1 = _sub([1])
    assert {t.block for t in build_plan(model, only1)} == {1}
    plan = build_plan(model, only1, spread=1)
    assert {t.block for t in plan} == {0, 1, 2}
    assert {t.layer for t in plan} == {1}
    # nearest wins: layers 0 and 3 with spread 1 → block 1 uses layer 0, block 2 uses layer 3
    plan = build_plan(model, _sub([0, 3]), spread=1)
    by_block = {t.block: t.layer for t in plan}
    assert by_block == {0: 0, 1: 0, 2: 3, 3: 3}
    # readers too: reader of block b needs layer b - 1
    plan = build_plan(model, only1, side="read", spread=1)
    assert {t.block for t in plan} == {1, 2, 3}  # positions 0, 1, 2 are within 1 of layer 1


# ------------------------------------------------------------------------------ explicit targets
def test_target_names_and_globs(models):
    model = models["llama"]
    sub = _sub(range(N_BLOCKS))
    plan = build_plan(model, sub, targets=["model.layers.*.self_attn.o_proj"])
    assert plan.modules == [f"model.layers.{b}.self_attn.o_proj" for b in range(N_BLOCKS)]
    assert all(t.layer == t.block and t.side == "write" for t in plan)
    # a reader named explicitly with side="both" is found to be a reader from the dataflow
    plan = build_plan(model, sub, targets=["model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"],
                      side="both")
    assert [(t.module, t.side, t.layer) for t in plan] == [
        ("model.layers.2.mlp.up_proj", "read", 1), ("model.layers.2.mlp.down_proj", "write", 2)]


def test_explicit_target_mapping(models):
    model = models["llama"]
    sub = _sub([1, 2])
    plan = build_plan(model, sub, targets={"model.layers.0.mlp.up_proj": (2, "read"),
                                           "model.layers.3.self_attn.o_proj": (1, "write")})
    up, o = plan["model.layers.0.mlp.up_proj"], plan["model.layers.3.self_attn.o_proj"]
    assert (up.layer, up.side, up.axis, up.block) == (2, "read", 1, 0)
    assert (o.layer, o.side, o.axis, o.block) == (1, "write", 0, 3)


def test_string_layer_keys_name_the_writing_module(models):
    model = models["llama"]
    name = "model.layers.1.self_attn.o_proj"
    sub = _sub([name])
    plan = build_plan(model, sub)
    assert len(plan) == 1
    t = plan[name]
    assert (t.layer, t.side, t.block, t.axis) == (name, "write", None, 0)


def test_target_outside_the_residual_stream(models):
    model = models["llama"]
    sub = _sub(range(N_BLOCKS))
    with pytest.raises(NoTargetError, match="not inside a decoder block"):
        build_plan(model, sub, targets=["model.norm"])
    with pytest.raises(NoTargetError, match="no module matches"):
        build_plan(model, sub, targets=["model.layers.*.nonexistent"])
    with pytest.raises(NoTargetError, match="needs the basis of layer 0"):
        build_plan(model, _sub([1]), targets=["model.layers.0.self_attn.o_proj"])


# ------------------------------------------------------------------------------ route_bias
def test_route_bias_default_follows_the_writers(models):
    gpt2, llama = models["gpt2"], models["llama"]
    sub = _sub([1])
    plan = build_plan(gpt2, sub)  # every GPT-2 writer has a bias
    assert all(t.bias for t in plan)
    for t in plan:
        a, b = t.adapter_shape
        assert t.adapter_params == a * b + t.rank
        assert t.weight_shape[t.axis] == D and t.adapter_shape[t.axis] == t.rank
    assert plan.adapter_params == sum(t.adapter_params for t in plan)
    assert not any(t.bias for t in build_plan(gpt2, sub, route_bias=False))
    assert not any(t.bias for t in build_plan(gpt2, sub, side="both"))  # one lora_bias switch: readers have none
    assert not any(t.bias for t in build_plan(llama, sub))  # Llama writers have no bias
    with pytest.raises(ConfigError, match="route_bias=False"):
        build_plan(llama, sub, route_bias=True)
    with pytest.raises(ConfigError, match="route_bias=True"):
        build_plan(gpt2, sub, side="both", route_bias=True)


# ------------------------------------------------------------------------------ the plan object
def test_plan_identity_lookup_and_summary(models):
    model = models["llama"]
    plan = build_plan(model, _sub([1, 2]))
    again = RoutingPlan(reversed(plan.targets), plan.subspace_hash)
    assert again.fingerprint() == plan.fingerprint()  # independent of order
    other = build_plan(model, _sub([1, 2], k=3))
    assert other.fingerprint() != plan.fingerprint()  # the rank is part of the identity
    with pytest.raises(KeyError):
        plan["model.layers.0.self_attn.o_proj"]
    rows = plan.summary().splitlines()
    assert len(rows) == len(plan) + 2
    assert rows[-1].startswith(f"{len(plan)} modules, {plan.adapter_params} adapter parameters")
    assert [d["module"] for d in plan.to_list()] == plan.modules
    t = plan.targets[0]
    with pytest.raises(RoutingError, match="routed twice"):
        RoutingPlan([t, RouteTarget(**{**t.__dict__, "side": "read"})], plan.subspace_hash)


def test_frozen_module_without_lora_warns(models):
    model = models["llama"]
    W = model.model.layers[1].self_attn.o_proj.weight
    W.requires_grad_(False)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            build_plan(model, _sub([1]))
        msgs = [str(x.message) for x in w if issubclass(x.category, GradrouteWarning)]
        assert len(msgs) == 1 and "model.layers.1.self_attn.o_proj" in msgs[0] and "frozen" in msgs[0]
    finally:
        W.requires_grad_(True)


# ------------------------------------------------------------------------------ bad input
BAD = [
    ("side", {"side": "writer"}, ConfigError, "side must be one of"),
    ("spread_negative", {"spread": -1}, ConfigError, "spread"),
    ("layer_without_module", {"sub": [3], "side": "read"}, NoTargetError, "layer 3"),
    ("layer_beyond_model", {"sub": [7]}, NoTargetError, "layer 7"),
    ("string_key_unknown", {"sub": ["model.nope"]}, NoTargetError, "model.nope"),
    ("mapping_bad_spec", {"targets": {"model.layers.1.mlp.up_proj": 1}}, ConfigError, "(layer, side)"),
    ("mapping_bad_side", {"targets": {"model.layers.1.mlp.up_proj": (1, "sideways")}}, ConfigError, "side"),
    ("mapping_unknown_layer", {"targets": {"model.layers.1.mlp.up_proj": (5, "read")}}, UnknownLayerError, "5"),
    ("mapping_unknown_module", {"targets": {"model.layers.9.mlp.up_proj": (1, "read")}}, NoTargetError,
     "model.layers.9.mlp.up_proj"),
    ("mapping_norm", {"targets": {"model.layers.1.input_layernorm": (1, "write")}}, UnsupportedModuleError,
     "LlamaRMSNorm"),
    ("mapping_linear_as_embed", {"targets": {"model.layers.1.mlp.up_proj": (1, "embed")}}, ConfigError,
     "not an embedding"),
    ("mapping_wrong_axis", {"targets": {"model.layers.1.mlp.down_proj": (1, "read")}}, HiddenSizeMismatchError,
     "residual dimension 128"),
]


@pytest.mark.parametrize("name,kw,err,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_typed_error_that_names_the_fix(models, name, kw, err, needle):
    kw = dict(kw)
    sub = _sub(kw.pop("sub", [1]))
    with pytest.raises(err) as e:
        build_plan(models["llama"], sub, **kw)
    assert isinstance(e.value, GradrouteError)
    msg = str(e.value)
    assert needle in msg
    problem, fix = msg.split(" Fix: ", 1)
    assert problem and fix.strip()


def test_non_integer_spread_is_a_config_error(models):
    with pytest.raises(ConfigError):
        build_plan(models["llama"], _sub([1]), spread="1")


def test_a_single_target_string_is_one_name(models):
    name = "model.layers.1.mlp.down_proj"
    try:
        plan = build_plan(models["llama"], _sub([1]), targets=name)
    except ConfigError as e:
        assert "targets" in str(e)
    else:
        assert plan.modules == [name]
