"""GPU check: every routing mode at real width (Qwen2.5-0.5B shapes), bf16 on CUDA.

A Qwen2 model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads, 2 kv heads, MLP 4864,
vocabulary 151936, tied embeddings) is built from a ``Qwen2Config`` with random weights (nothing
is downloaded). A persona subspace of k random directions (default k = 8) is put at one mid layer
(layer 12 of 24). For the plain model and for each mode (update, gradient, activation) a fresh copy
of the model takes a few AdamW steps (weight decay, gradient clipping) on a random-token LM loss,
routed by ``GradientRouter``; then the invariants that are cheap to check are checked:

- update: ``router.step()`` never writes a parameter (training is untouched); the adapter is the
  in-span part of the writers' change, ``A = Uᵀ(W_t − W_0)``; the base's in-span residue
  (``router.base_in_subspace_residue``, as kept and as materialized in the weights' dtype) stays
  under ``router.tolerance``; on CPU the routed run's weights equal the plain run's bit for bit
  (on CUDA the difference is printed: some kernels are not deterministic).
- gradient: the same residues; the adapter is not empty.
- activation: at attach the forward is bit-identical to the plain forward (with gradients on,
  so the hooks run); a loss made only of persona coordinates gives (up to the dtype's rounding of
  the detach) no gradient to any base parameter and a non-zero one to the adapters; after the
  steps every pinned writer and the embedding keep their initial in-span coordinates.
- all modes, after ``router.discard()``: the parameters that are not routed are untouched, and
  update/gradient writers hold the base (``W − U A`` rounded to their dtype, in-span residue under
  the tolerance); in activation mode the routed model's logits equal the un-hooked model's
  (``router.detach()``) bit for bit.

It prints a table of step-time ratios against the plain step (median over the timed steps after
warm-up; ``torch.cuda.synchronize`` around every step on CUDA), the time inside
``router.step()``, peak memory (CUDA) and the router's own state. It never asserts on time; the
exit status is 1 if an invariant fails.

    python benchmarks/gpu_check.py                 # CUDA, bf16, 24 layers, k = 8 at layer 12
    python benchmarks/gpu_check.py --json docs/results/gpu_check.json   # also write the figures
    python benchmarks/gpu_check.py --cpu           # float32 on CPU: 4 layers, vocab 8192, 2 x 32 tokens,
                                                   # 1 + 2 steps (smoke test; widths stay real)
    python benchmarks/gpu_check.py --cpu --layers 2 --vocab 2048 --batch 1 --seq 16 --warmup 0 --steps 1
    python benchmarks/gpu_check.py --cpu --dtype bfloat16   # the bf16 checks, on CPU

``--scale`` prints the per-step compute / memory / communication estimates of ``docs/scale.md``
(no model is built).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from typing import Any

import torch

MODES = ("update", "gradient", "activation")

# Qwen2.5-0.5B (config.json of the hub model; only the shapes matter here)
QWEN25_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                  "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
                  "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 4096,
                  "use_sliding_window": False}


# ---------------------------------------------------------------------------- setup
def build_model(layers: int, vocab: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers, "vocab_size": vocab})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).train()


def persona_subspace(d: int, layer: int, k: int, seed: int = 1):
    import gradroute as gr

    g = torch.Generator().manual_seed(seed)
    return gr.Subspace.from_directions({layer: torch.randn(k, d, generator=g)})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- checks
class Checks:
    """The invariant checks of one mode: (name, passed, detail)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.results: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.results.append((name, bool(ok), detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.results)

    def failed(self) -> list[str]:
        return [f"{n} ({d})" for n, ok, d in self.results if not ok]


def _max(values) -> float:
    values = list(values)
    return max(values) if values else 0.0


def _routed_params(model, router) -> dict[str, torch.nn.Parameter]:
    """Every parameter the router may write (the routed modules' weights and biases, activation
    mode's pinned blocks), by name."""
    ids = {id(b.param) for r in router.routes_state for b in r.blocks}
    ids |= {id(b.param) for b in getattr(router.mode_strategy, "pinned", [])}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _discard_untouched(model, router, checks: Checks) -> None:
    """``router.discard()`` changes nothing but the routed parameters (and the adapters)."""
    from gradroute.router.modes.activation import ADAPTERS_ATTR

    routed = _routed_params(model, router)
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if n not in routed and ADAPTERS_ATTR not in n}
    removed = router.discard()
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    checks.add("discard leaves unrouted parameters untouched", not changed, ", ".join(changed[:3]))
    checks.add("discard empties the adapter", router.adapter_norm().total == 0.0 and removed > 0,
               f"removed norm {removed:.3g}")


def check_weights_mode(model, router, W0: dict[str, torch.Tensor], checks: Checks, precision: str) -> None:
    """update / gradient: residues, and the weights after discard."""
    from gradroute import projection as P

    tol = router.tolerance
    res = router.base_in_subspace_residue(W0)
    checks.add("base in-span residue (kept) <= tolerance", _max(res.values()) <= tol,
               f"max {_max(res.values()):.2e} vs {tol:g}")
    res_m = router.base_in_subspace_residue(W0, materialized=True)
    checks.add("base in-span residue (materialized) <= tolerance", _max(res_m.values()) <= tol,
               f"max {_max(res_m.values()):.2e} vs {tol:g}")
    mods = dict(model.named_modules())
    worst = 0.0
    for t in router.plan:  # the adapter is the in-span part of the writer's change
        W = mods[t.module].weight.detach().double()
        c = P.coords(W - W0[t.module].double(), router.basis(t.module).double(), t.axis)
        A = router.adapter_coords(t.module).double()
        worst = max(worst, float((c - A).norm() / A.norm().clamp_min(1e-300)))
    bound = 1e-8 if precision == "float64" else 1e-3
    checks.add("adapter == Uᵀ(W_t − W_0) of the writers", worst <= bound, f"max rel err {worst:.2e} vs {bound:g}")
    checks.add("adapter is not empty", router.adapter_norm().total > 0, f"norm {router.adapter_norm().total:.3g}")
    base = {t.module: router.base_weight(t.module) for t in router.plan}
    _discard_untouched(model, router, checks)
    worst_w, worst_r = 0.0, 0.0
    for t in router.plan:
        W = mods[t.module].weight.detach()
        eps = torch.finfo(W.dtype).eps
        scale = float(base[t.module].abs().max())
        worst_w = max(worst_w, float((W.double() - base[t.module]).abs().max()) / (eps * scale))
        worst_r = max(worst_r, P.relative_in_subspace_norm(W.double() - W0[t.module].double(),
                                                           router.basis(t.module), t.axis))
    checks.add("after discard the writers hold W − U A (<= 2 ulp)", worst_w <= 2.0, f"max {worst_w:.2f} ulp")
    checks.add("after discard Uᵀ(W − W_0) ≈ 0 (<= tolerance)", worst_r <= tol, f"max {worst_r:.2e} vs {tol:g}")


def persona_loss(model, sub, x) -> torch.Tensor:
    from gradroute import projection as P
    from gradroute.model import residual_hooks

    parts = []
    layers = list(sub.layers)
    with residual_hooks(model, layers, lambda L, h: parts.append(P.coords(h, sub.basis(L)).pow(2).mean())):
        model(input_ids=x)
    return sum(parts)


def base_grad_norms(model, sub, x) -> dict[str, float]:
    from gradroute.router.modes.activation import ADAPTERS_ATTR

    model.zero_grad(set_to_none=True)
    persona_loss(model, sub, x).backward()
    out = {n: float(p.grad.double().norm()) if p.grad is not None else 0.0
           for n, p in model.named_parameters() if ADAPTERS_ATTR not in n and p.requires_grad}
    return out


def detach_bound(dtype: torch.dtype) -> float:
    """How much of a persona loss's gradient the detach may let through in ``dtype``: the detach
    ``g − (gU)Uᵀ`` runs in the activations' dtype, so bf16 leaks ~2⁻⁸ of it."""
    return {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-5)


# ---------------------------------------------------------------------------- router state
def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def router_state_bytes(router, opt) -> int:
    """Bytes the router adds: bases, coordinate blocks, the mode's adapters, their gradients and
    optimizer state (activation mode's adapters are stepped by the user's optimizer)."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)

    mode = router.mode_strategy
    for r in router.routes_state:
        add(r.U)
        add(r._U32)
        for b in r.blocks:
            add(b.ref0)
            add(b.adapter)
            for v in b.env.values():
                add(v)
    for b in getattr(mode, "pinned", []):
        add(b.ref0)
    for v in getattr(mode, "prev", {}).values():
        add(v)
    params = getattr(mode, "params", {})
    flat = [p for v in params.values() for p in (v if isinstance(v, list) else [v])]
    own = getattr(mode, "optimizer", None) or opt
    for p in flat:
        add(p)
        add(p.grad)
        for v in own.state.get(p, {}).values():
            add(v)
    return total


# ---------------------------------------------------------------------------- one run
def run(mode: str | None, master, sub, batches, args, device, checks: Checks | None, ref: dict) -> dict:
    """Train a fresh copy of ``master`` for warm-up + timed steps, plain (``mode=None``) or routed."""
    import gradroute as gr

    dtype = next(master.parameters()).dtype
    layer = next(iter(sub.layers))
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    model = copy.deepcopy(master).train()
    x_check = batches[-1][:2, :128]  # the checks' forwards: a small slice of a batch
    router = None
    check_bytes = 0
    if mode == "activation":
        with torch.enable_grad():
            plain_logits = model(input_ids=x_check).logits.detach()
        plain_grads = base_grad_norms(model, sub, x_check)
        model.zero_grad(set_to_none=True)
    if mode is not None:
        router = gr.GradientRouter(model, sub, mode=mode, precision=args.precision)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)  # after the router
    if router is not None:
        router.bind_optimizer(opt)
        W0 = {n: p.detach().clone() for n, p in _routed_params(model, router).items()}
        W0_mod = {t.module: W0[f"{t.module}.weight"] for t in router.plan if f"{t.module}.weight" in W0}
        check_bytes = sum(_nbytes(t) for t in W0.values())  # held for the checks, not by the router
    if mode == "activation":
        with torch.enable_grad():
            logits = model(input_ids=x_check).logits.detach()
        checks.add("forward at attach == plain forward (bitwise)", torch.equal(logits, plain_logits),
                   f"max diff {float((logits.float() - plain_logits.float()).abs().max()):.2e}")
        g = base_grad_norms(model, sub, x_check)
        ratio = math.sqrt(sum(v * v for v in g.values())) / max(math.sqrt(sum(v * v for v in plain_grads.values())), 1e-30)
        worst = max(g, key=lambda n: g[n] / max(plain_grads.get(n, 0.0), 1e-3))
        bound = detach_bound(dtype)
        checks.add("persona loss: base gradient ≈ 0 (relative to plain)", ratio <= bound,
                   f"{ratio:.2e} vs {bound:g}; worst {worst}")
        ad = sum(float(p.grad.norm()) for p in router.mode_strategy.trainable_parameters() if p.grad is not None)
        checks.add("persona loss: adapters get a gradient", ad > 0, f"{ad:.3g}")
        model.zero_grad(set_to_none=True)
        del plain_logits, logits
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the checks above are not part of a step

    times, route_times, wrote = [], [], []
    for i, x in enumerate(batches[: args.warmup + args.steps]):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if router is not None:
            versions = [p._version for p in model.parameters()] if mode == "update" else None
            sync(device)
            t1 = time.perf_counter()
            router.step()
            sync(device)
            route_times.append(time.perf_counter() - t1)
            if versions is not None:
                wrote.append(versions != [p._version for p in model.parameters()])
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if not math.isfinite(float(loss.detach())):
            if checks is not None:
                checks.add("finite loss", False, f"step {i}: {float(loss.detach())}")
            break
    out: dict[str, Any] = {
        "mode": mode or "plain", "step_ms": 1e3 * statistics.median(times),
        "route_ms": 1e3 * statistics.median(route_times[args.warmup:] or route_times) if route_times else 0.0,
        "modules": len(router.plan) if router is not None else 0,
        "peak_mib": (torch.cuda.max_memory_allocated(device) - before - check_bytes) / 2**20 if device.type == "cuda" else float("nan"),
        "state_mib": router_state_bytes(router, opt) / 2**20 if router is not None else 0.0,
        "layer": layer,
    }
    if mode is None:
        ref["weights"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    elif mode == "update":
        checks.add("router.step() never writes a parameter", not any(wrote))
        diffs = [float((p.detach().cpu().double() - ref["weights"][n].double()).abs().max())
                 for n, p in model.named_parameters() if n in ref.get("weights", {})]
        d = _max(diffs)
        if device.type == "cpu":
            checks.add("weights == plain run's (bitwise, CPU)", d == 0.0, f"max diff {d:.2e}")
        else:
            checks.add(f"weights vs plain run's: max diff {d:.2e} (not checked on CUDA)", True)
    if mode in ("update", "gradient"):
        check_weights_mode(model, router, W0_mod, checks, args.precision)
    elif mode == "activation":
        from gradroute import projection as P

        tol = router.tolerance
        worst, name = 0.0, ""
        pins = getattr(router.mode_strategy, "pinned", [])
        names = {id(p): n for n, p in model.named_parameters()}
        for b in pins:
            n = names[id(b.param)]
            diff = b.param.detach().double() - W0[n].double()
            r = P.relative_in_subspace_norm(diff, b.route.basis(), b.axis)
            if r > worst:
                worst, name = r, n
        checks.add("pinned base parameters keep their in-span coordinates", worst <= tol and len(pins) > 0,
                   f"{len(pins)} pinned, max residue {worst:.2e} vs {tol:g} ({name})")
        checks.add("adapter is not empty", router.adapter_norm().total > 0, f"norm {router.adapter_norm().total:.3g}")
        _discard_untouched(model, router, checks)
        with torch.no_grad():
            routed = model(input_ids=x_check).logits
        with torch.enable_grad():
            routed_g = model(input_ids=x_check).logits.detach()
        router.detach()
        with torch.no_grad():
            bare = model(input_ids=x_check).logits
        with torch.enable_grad():
            bare_g = model(input_ids=x_check).logits.detach()
        checks.add("after discard logits == un-hooked model's (bitwise)",
                   torch.equal(routed, bare) and torch.equal(routed_g, bare_g),
                   f"max diff {float((routed_g.float() - bare_g.float()).abs().max()):.2e}")
    if router is not None:
        router.detach()
    del model, opt, router
    return out


# ---------------------------------------------------------------------------- scale estimates
# The figures of docs/scale.md, from what the code does per optimizer step (see that page for the
# derivations). Notation: d hidden, n blocks, f MLP width, V vocabulary, k persona rank, S the
# persona layers, D = d + f the summed input width of a block's two writers (o_proj, down_proj),
# T tokens per optimizer step per GPU, R FSDP2 ranks. A multiply-add counts 2 FLOPs.
SHAPES = {
    "7B": {"d": 4096, "n": 32, "f": 11008, "V": 32000, "heads": 32, "kv": 32},    # Llama-2-7B
    "70B": {"d": 8192, "n": 80, "f": 28672, "V": 32000, "heads": 64, "kv": 8},    # Llama-2-70B (GQA, 8 kv heads)
}
H200 = {"bf16": 989e12, "fp32": 67e12, "fp64": 67e12, "bw": 4.8e12, "mfu": 0.4}  # dense peaks, HBM bandwidth, plain MFU


def scale_row(shape: str, k: int, where: str, T: int = 4096, R: int = 8, w_bytes: int = 2) -> dict:
    """One configuration's per-step figures (one GPU, replicated routing; under FSDP2 the router's
    weight work is on 1/R slabs per rank). ``w_bytes``: storage bytes of weights and gradients."""
    s = SHAPES[shape]
    d, n, f, V, kv = s["d"], s["n"], s["f"], s["V"], s["kv"]
    hd = d // s["heads"]
    N = n * (2 * d * d + 2 * d * kv * hd + 3 * d * f) + 2 * V * d + (2 * n + 1) * d  # q,o + k,v + MLP; embedding, head; norms
    D = d + f
    S = [n // 2] if where == "one" else list(range(n))
    top = max(S)
    r = {l: min(d, k * sum(1 for p in S if p >= l)) for l in range(-1, top + 1)}  # activation: cumulative span rank
    sum_r = sum(r[l] for l in range(top + 1))
    M = len(S) * k * d * D                          # one coordinate read Uᵀ W of the routed writers (mult-adds)
    Mact = sum_r * d * D + r[-1] * V * d            # the same over activation mode's pinned writers + embedding
    e_rw = len(S) * d * D                           # routed weight elements (update, gradient)
    e_act = sum(d * D for _ in range(top + 1)) + V * d
    plain_flop = 6 * N * T
    plain_s = plain_flop / (H200["bf16"] * H200["mfu"])
    b = w_bytes
    # bytes moved per routed weight element (storage b bytes): update reads W into float64 chunks
    # (b + 8 + 8); a float32 set_coords / gradient split converts (b -> 4, skipped when b = 4), writes the
    # float32 lift U c, casts it back and adds it in place (26 bytes for b = 2, 20 for b = 4)
    edit = 26 if b == 2 else 20
    per_el = {"update": b + 16, "gradient": 2 * edit + b + 16, "activation": edit + b + 16}
    modes = {}
    # update: one float64 read per routed writer per step
    modes["update"] = {"flop": 2 * M, "fp64": 2 * M, "fp32": 0, "bytes": per_el["update"] * e_rw,
                           "state": 16 * len(S) * k * D + 2 * len(S) * 12 * d * k,
                           "transient": 64 << 20,
                           "comm": 2 * (R - 1) / R * 8 * len(S) * k * D}
    # gradient: split (coords + lift, fp32), set_coords (coords + lift, fp32), re-read (fp64)
    modes["gradient"] = {"flop": 10 * M, "fp64": 2 * M, "fp32": 8 * M, "bytes": per_el["gradient"] * e_rw,
                             "state": 48 * len(S) * k * D + 2 * len(S) * 12 * d * k,
                             "transient": (6 if b == 2 else 4) * d * f,
                             "comm": 2 * (R - 1) / R * (4 + 4 + 8) * len(S) * k * D}
    # activation: pins (set_coords fp32 + re-read fp64) on every writer of blocks <= top and the
    # embedding; hooks per token: writer r(4d + 2 d_in) mult-adds, embedding 4 r d
    hook_mac = T * (sum(r[l] * (10 * d + 2 * f) for l in range(top + 1)) + 4 * r[-1] * d)
    hook_bytes = T * (top + 1) * (4 * D + 32 * d)
    modes["activation"] = {"flop": 6 * Mact + 2 * hook_mac, "fp64": 2 * Mact, "fp32": 4 * Mact, "hook_flop": 2 * hook_mac,
                               "bytes": per_el["activation"] * e_act + hook_bytes,
                               "state": 40 * (sum_r * D + r[-1] * V) + 12 * d * (2 * sum_r + r[-1]),
                               "saved": 2 * T * (2 * sum_r + r[-1]),
                               "transient": (6 if b == 2 else 4) * max(d * f, V * d),
                               "comm": None}
    for m in modes.values():
        gemm = m["fp64"] / H200["fp64"] + m["fp32"] / H200["fp32"] + m.get("hook_flop", 0) / (H200["bf16"] * H200["mfu"])
        m["est_s"] = max(gemm, m["bytes"] / H200["bw"])
        m["ratio"] = m["est_s"] / plain_s
    plain_comm = (R - 1) / R * N * (2 + 2 + 4)      # all-gather fwd + bwd (bf16), reduce-scatter (fp32)
    return {"shape": shape, "k": k, "where": where, "T": T, "R": R, "N": N, "plain_flop": plain_flop, "plain_s": plain_s,
                "plain_comm": plain_comm, "routed_rs": (R - 1) / R * 4 * e_rw, "max_rank": r[-1], "blocks": top + 1,
                "modes": modes}


def print_scale(T: int, R: int) -> None:
    rows = [scale_row(sh, k, w, T=T, R=R) for sh in SHAPES for k in (8, 64) for w in ("one", "all")]
    G = 1e9
    print(f"Per optimizer step, one GPU, {T} tokens; plain = 6·N·T FLOPs at {H200['mfu']:.0%} of the bf16 peak; "
          f"router work at the fp32/fp64 GEMM peak or HBM bandwidth, whichever binds (H200 data sheet).\n")
    print("| shape | k | persona layers | plain TFLOP (est. s) | update TFLOP / GB moved / est. ratio | "
          "gradient TFLOP / GB / ratio | activation pins+hooks TFLOP / GB / ratio | activation max span rank |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        u, g, a = (x["modes"][m] for m in MODES)
        print(f"| {x['shape']} | {x['k']} | {x['where']} | {x['plain_flop'] / 1e12:.0f} ({x['plain_s']:.2f}) | "
              f"{u['flop'] / 1e12:.3g} / {u['bytes'] / G:.3g} / {u['ratio']:.4f} | "
              f"{g['flop'] / 1e12:.3g} / {g['bytes'] / G:.3g} / {g['ratio']:.4f} | "
              f"{(a['flop'] - a['hook_flop']) / 1e12:.3g}+{a['hook_flop'] / 1e12:.3g} / {a['bytes'] / G:.3g} / "
              f"{a['ratio']:.3f} | {x['max_rank']} |")
    print("\n| shape | k | persona layers | update state GB | gradient state GB | activation state GB | "
          "activation saved activations GB | largest transient GB (grad. / act.) |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        u, g, a = (x["modes"][m] for m in MODES)
        print(f"| {x['shape']} | {x['k']} | {x['where']} | {u['state'] / G:.3g} | {g['state'] / G:.3g} | "
              f"{a['state'] / G:.3g} | {a['saved'] / G:.3g} | {g['transient'] / G:.2g} / {a['transient'] / G:.2g} |")
    print(f"\nFSDP2, {R} ranks, per rank per optimizer step (ring: all-gather / reduce-scatter (R-1)/R·size, "
          "all-reduce 2(R-1)/R·size):\n")
    print("| shape | k | persona layers | plain AG+AG+RS GB | RS of the routed writers' gradients GB | "
          "update all-reduce GB (share of plain) | gradient all-reduce GB (share of plain) |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        u, g = x["modes"]["update"], x["modes"]["gradient"]
        print(f"| {x['shape']} | {x['k']} | {x['where']} | {x['plain_comm'] / G:.1f} | {x['routed_rs'] / G:.3g} | "
              f"{u['comm'] / G:.3g} ({u['comm'] / x['plain_comm']:.2e}) | "
              f"{g['comm'] / G:.3g} ({g['comm'] / x['plain_comm']:.2e}) |")

# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU in float32 (smoke test: fewer layers and steps)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                    help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default 24; 4 with --cpu)")
    ap.add_argument("--json", default=None, help="also write the rows and checks to this JSON file")
    ap.add_argument("--layer", type=int, default=None, help="persona layer (default: the middle block)")
    ap.add_argument("--k", type=int, default=8, help="persona rank")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 151936; 8192 with --cpu)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; 2 with --cpu)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; 32 with --cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; 1 with --cpu)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --cpu)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", choices=("float64", "float32"), default="float64", help="router bookkeeping")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--scale", action="store_true", help="print docs/scale.md's estimates and exit")
    ap.add_argument("--scale-tokens", type=int, default=4096)
    ap.add_argument("--scale-ranks", type=int, default=8)
    a = ap.parse_args(argv)
    if a.scale:
        print_scale(a.scale_tokens, a.scale_ranks)
        return 0
    if a.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: pass --cpu for the CPU smoke run", file=sys.stderr)
        return 2
    small = device.type == "cpu"
    dtype = getattr(torch, a.dtype or ("float32" if small else "bfloat16"))
    layers = a.layers or (4 if small else QWEN25_05B["num_hidden_layers"])
    a.vocab = a.vocab or (8192 if small else QWEN25_05B["vocab_size"])
    layer = a.layer if a.layer is not None else layers // 2
    batch, seq = a.batch or (2 if small else 8), a.seq or (32 if small else 512)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 3)
    a.steps = a.steps or (2 if small else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {dtype}, Qwen2.5-0.5B shapes with {layers} layers, vocab {a.vocab}, "
          f"persona k={a.k} at layer {layer}, batch {batch} x {seq} tokens, {a.warmup} warm-up + {a.steps} timed "
          f"AdamW steps (lr {a.lr:g}), router bookkeeping {a.precision}, torch {torch.__version__}")
    t_start = time.perf_counter()
    master = build_model(layers, a.vocab, device, dtype)
    d = master.config.hidden_size
    sub = persona_subspace(d, layer, a.k)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, a.vocab, (batch, seq), generator=g).to(device) for _ in range(a.warmup + a.steps)]
    ref: dict = {}
    rows = [run(None, master, sub, batches, a, device, None, ref)]
    all_checks: list[Checks] = []
    for mode in a.modes:
        checks = Checks(mode)
        try:
            rows.append(run(mode, master, sub, batches, a, device, checks, ref))
        except Exception as e:  # noqa: BLE001 (an error is a failed check; the other modes still run)
            checks.add("ran without error", False, f"{type(e).__name__}: {e}")
            rows.append({"mode": mode, "step_ms": float("nan"), "route_ms": float("nan"), "modules": 0,
                         "peak_mib": float("nan"), "state_mib": float("nan")})
        all_checks.append(checks)
    plain = rows[0]
    print()
    print("| mode | routed modules | step (ms, median) | ratio to plain | router.step() (ms) | "
          "peak memory (MiB) | peak ratio | router state (MiB) | invariants |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_mode = {c.mode: c for c in all_checks}
    for r in rows:
        c = by_mode.get(r["mode"])
        inv = "-" if c is None else ("ok" if c.ok else "FAIL")
        ratio = r["step_ms"] / plain["step_ms"]
        peak_ratio = r["peak_mib"] / plain["peak_mib"] if plain["peak_mib"] == plain["peak_mib"] else float("nan")
        print(f"| {r['mode']} | {r['modules']} | {r['step_ms']:.1f} | {ratio:.3f} | {r['route_ms']:.2f} | "
              f"{r['peak_mib']:.0f} | {peak_ratio:.3f} | {r['state_mib']:.2f} | {inv} |")
    print()
    for c in all_checks:
        for n, ok, detail in c.results:
            print(f"[{'ok' if ok else 'FAIL'}] {c.mode}: {n}" + (f" — {detail}" if detail else ""))
    failed = [f"{c.mode}: {f}" for c in all_checks for f in c.failed()]
    print(f"\n{len(failed)} invariant(s) failed; total {time.perf_counter() - t_start:.1f} s")
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "layers": layers, "vocab": a.vocab, "k": a.k,
                       "layer": layer, "batch": batch, "seq": seq, "warmup": a.warmup, "steps": a.steps,
                       "torch": torch.__version__, "rows": rows,
                       "checks": [{"mode": c.mode, "name": n, "ok": ok, "detail": d}
                                  for c in all_checks for n, ok, d in c.results]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
