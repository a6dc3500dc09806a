"""Router overhead: routed vs plain training step time, extra memory, routing cost vs FLOPs.

One interleaved run: plain and routed copies of the same model take alternating steps on
the same batches, so machine noise hits both alike; the ratio is the median over measured
steps of routed/plain for each adjacent pair. Model: Llama-style, 4 layers, d = 512 (MLP 1376),
every block's writers routed, subspace rank k per layer.

    python benchmarks/router_overhead.py            # k = 4, 16, 64; prints a markdown table
    python benchmarks/router_overhead.py --quick    # tiny sizes, for the test suite

Extra memory is the router's own state per routed module (Uᵀ W_0 and the adapter A; gradient
mode adds the adapter's AdamW moments and gradient) in units of k·d_in float32 values.
The routing cost alone is ``router.step()`` in update mode, against its theoretical
2·k·d_in·d_out FLOPs per module (one coordinate product Uᵀ W).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _model(d: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(d * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 128),
                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _state_floats(router) -> float:
    """Router state per routed module, in k·d_in float32 units (averaged over modules)."""
    units = []
    mode = router.mode_strategy
    opt = router.adapter_optimizer or router.optimizer
    for r in router.routes_state:
        b = r.blocks[0]
        nbytes = b.ref0.numel() * b.ref0.element_size() + b.adapter.numel() * b.adapter.element_size()
        live = mode.params.get(r.name) if hasattr(mode, "params") else None
        for p in (live if isinstance(live, list) else [live] if live is not None else [])[:1]:
            st = opt.state.get(p, {}) if opt is not None else {}
            nbytes += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
            nbytes += p.numel() * p.element_size() if router.mode == "activation" else 0
            if p.grad is not None:
                nbytes += p.grad.numel() * p.grad.element_size()
        units.append(nbytes / (4 * b.adapter.numel()))
    return statistics.mean(units)


def measure(k: int, mode: str, *, d: int, layers: int, vocab: int, batch: int, seq: int,
            warmup: int, steps: int, precision: str = "float64") -> dict:
    import gradroute as gr

    plain = _model(d, layers, vocab)
    routed = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(1)
    sub = gr.Subspace.from_directions({L: torch.randn(k, d, generator=g) for L in range(layers)})
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.01)
    router = gr.GradientRouter(routed, sub, mode=mode, precision=precision)
    opt_r = torch.optim.AdamW(routed.parameters(), lr=1e-4, weight_decay=0.01)  # after the router (activation adapters)
    router.bind_optimizer(opt_r)
    batches = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(warmup + steps)]

    def step(model, opt, x, route):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if route:
            router.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    tp, tr = [], []
    for i, x in enumerate(batches):
        a = step(plain, opt_p, x, False)
        b = step(routed, opt_r, x, True)
        if i >= warmup:
            tp.append(a)
            tr.append(b)
    # routing cost alone (update mode): time router.step() on unchanged weights' bookkeeping
    route_times = []
    if mode == "update":
        for _ in range(5):
            with torch.no_grad():
                for p in routed.parameters():
                    p.add_(1e-6)
            router._opt_steps += 1  # an "optimizer step" happened
            t = time.perf_counter()
            router.step()
            route_times.append(time.perf_counter() - t)
    flops = sum(2 * t.rank * t.weight_shape[0] * t.weight_shape[1] for t in router.plan)
    res = {
        "k": k, "mode": mode, "precision": precision,
        "plain_ms": 1e3 * statistics.median(tp), "routed_ms": 1e3 * statistics.median(tr),
        "ratio": statistics.median(b / a for a, b in zip(tp, tr)),  # per adjacent pair
        "state_floats_per_kdin": _state_floats(router),
        "modules": len(router.plan),
    }
    if route_times:
        sec = statistics.median(route_times)
        res.update(route_ms=1e3 * sec, route_gflop=flops / 1e9, route_gflops=flops / sec / 1e9)
    return res


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    size = dict(d=64, layers=2, vocab=101, batch=2, seq=16, warmup=1, steps=3) if a.quick else \
        dict(d=512, layers=4, vocab=2048, batch=8, seq=128, warmup=3, steps=a.steps)
    ks = [2] if a.quick else a.ks
    rows = []
    for k in ks:
        for mode, prec in (("update", "float64"), ("update", "float32"), ("gradient", "float64"),
                           ("activation", "float64")):
            rows.append(measure(k, mode, precision=prec, **size))
    print("| k | mode | bookkeeping | plain step (ms) | routed step (ms) | ratio | router state (k·d_in floats/module) | route() alone (ms) | route() GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['mode']} | {r['precision']} | {r['plain_ms']:.1f} | {r['routed_ms']:.1f} | "
              f"{r['ratio']:.3f} | {r['state_floats_per_kdin']:.1f} | "
              f"{r.get('route_ms', float('nan')):.2f} | {r.get('route_gflops', float('nan')):.2f} |")
    return rows


if __name__ == "__main__":
    main()
