"""Real-vLLM check of gradroute's weight sync (issue 20): ``python vllm_sync_real.py OUT.json``.

Needs vLLM's CPU build (``make test-vllm`` sets up ``.venv-vllm``; tests/test_vllm_real.py runs
this in a subprocess, as vLLM's engine wants a ``__main__`` guard).

A tiny Llama (head_dim 64, untied embeddings, float32) is saved locally; TRL's GRPOTrainer
trains it with ``use_vllm=True, vllm_mode="colocate"`` (a real ``vllm.LLM`` in this process)
and ``gr.attach(trainer, subspace, mode="activation")``, so every weight sync during training
goes through gradroute's folded stream. After training, TRL's own ``sync_weights()`` pushes the
final policy once more, and vLLM's prompt log-probs are compared with the routed model's
(transformers, adapter hooks on). Then the same weights are pushed *without* the fold (TRL's
original stream, gradroute's names dropped) to show the comparison can fail, and a plain
transformers model loaded with those unfolded weights is compared with vLLM as a control (so a
mismatch is the adapter, not vLLM's numerics). The figures go to OUT.json.

Test-only changes to vLLM/TRL, both outside the sync path:
- ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` is replaced by plain
  ``F.linear``: vLLM-CPU otherwise packs each Linear's weight into a oneDNN/SGL handle at load
  time and drops ``layer.weight``, so any later ``load_weights`` (TRL's colocate sync, with or
  without gradroute) cannot change what the engine computes (``--no-gemm-patch`` shows it).
- TRL builds ``LLM(...)`` without ``dtype``; vLLM's ``"auto"`` downcasts a float32 checkpoint
  to bfloat16, and bf16 rounding alone is ~1e-2 in log-prob. ``dtype="float32"`` is added
  (and ``enforce_eager=True`` with ``--eager``).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (TRL's colocate mode)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("GRADROUTE_ALLOW_UNTESTED", "1")  # vllm-cpu 0.32 pins transformers<5.20
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

T0 = time.time()
LAYERS = (1, 3)


def patch_cpu_gemm() -> None:
    import torch.nn.functional as F
    import vllm.model_executor.layers.utils as U

    def keep_plain_weight(layer, remove_weight):
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    U.dispatch_cpu_unquantized_gemm = keep_plain_weight


def patch_llm_kwargs(**extra) -> None:
    import trl.generation.vllm_generation as vg

    real = vg.LLM

    def LLM(*a, **kw):
        return real(*a, **{**kw, **extra})

    vg.LLM = LLM


def bang_reward(completions, **kw):
    """Rewards '!' — the direction of the persona subspace, so the adapters grow."""
    return [float(c.count("!")) - 0.1 * float(c.count(" ")) for c in completions]


def prompt_logprobs_vllm(llm, ids_list):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in ids_list], sp, use_tqdm=False)
    res = []
    for ids, o in zip(ids_list, outs):
        lp = o.prompt_logprobs
        res.append([lp[t][ids[t]].logprob for t in range(1, len(ids))])
    return res


def prompt_logprobs_hf(model, ids_list):
    import torch

    res = []
    with torch.no_grad():
        for ids in ids_list:
            x = torch.tensor([ids])
            lp = model(input_ids=x).logits.float().log_softmax(-1)[0]
            res.append([float(lp[t - 1, ids[t]]) for t in range(1, len(ids))])
    return res


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def engine_model(backend):
    return backend.llm.llm_engine.model_executor.driver_worker.model_runner.model  # as TRL reaches it


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True (skip vLLM's compilation)")
    ap.add_argument("--no-gemm-patch", action="store_true", help="keep vLLM-CPU's packed GEMMs (shows why the patch)")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    torch.manual_seed(0)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    import gradroute as gr
    from gradroute.integrations.vllm import MARK
    from gradroute.testing import save_tiny_lm

    if not a.no_gemm_patch:
        patch_cpu_gemm()
    patch_llm_kwargs(dtype="float32", **({"enforce_eager": True} if a.eager else {}))
    result: dict = {"versions": {}, "gemm_patch": not a.no_gemm_patch, "eager": a.eager}
    for pkg in ("vllm-cpu", "trl", "transformers", "peft", "torch"):
        from importlib.metadata import version

        result["versions"][pkg] = version(pkg)

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_lm(Path(tmp) / "tiny", "llama", hidden_size=128, num_heads=2, num_layers=4)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        cfg = model.config
        assert cfg.hidden_size // cfg.num_attention_heads == 64 and not cfg.tie_word_embeddings
        ds = Dataset.from_dict({"prompt": [f"Q{i}: say it" for i in range(64)]})
        args = GRPOConfig(output_dir=str(Path(tmp) / "run"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                          learning_rate=a.lr, max_steps=a.steps, report_to=[], logging_steps=1, seed=0,
                          disable_tqdm=True, save_strategy="no",
                          use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128)
        t = time.time()
        trainer = GRPOTrainer(model=model, reward_funcs=bang_reward, args=args, train_dataset=ds,
                              processing_class=tok)
        result["engine_start_s"] = round(time.time() - t, 1)
        backend = trainer.vllm_generation
        assert isinstance(backend, VLLMGeneration)

        bang = tok.convert_tokens_to_ids("!")
        direction = model.lm_head.weight.detach()[bang][None]
        persona = gr.Subspace.from_directions({L: direction for L in LAYERS}, names=["bang"])
        handle = gr.attach(trainer, persona, mode="activation", env_column=None,
                           run_dir=Path(tmp) / "gr")
        router = handle.router
        assert getattr(backend._iter_named_params, MARK, None) is router, "attach did not install the vLLM sync"

        syncs = []
        real_sync = backend.sync_weights

        def counting_sync():
            syncs.append(trainer.state.global_step)
            return real_sync()

        backend.sync_weights = counting_sync  # TRL calls self.vllm_generation.sync_weights()
        t = time.time()
        trainer.train()
        result["train_s"] = round(time.time() - t, 1)
        result["syncs_during_training_at_step"] = list(syncs)
        # TRL's own on-policy check during training: |vLLM's sampling log-prob - the trainer's| per token
        result["trl_sampling_logp_difference_max"] = [
            float(h["sampling/sampling_logp_difference/max"]) for h in trainer.state.log_history
            if "sampling/sampling_logp_difference/max" in h]
        norms = {n: float(p.detach().norm()) for n, p in router.mode_strategy.params.items()}
        result["adapter_norms"] = norms

        backend.sync_weights()  # TRL's sync of the final policy (what the next generation would push first)
        model = trainer.model.eval()
        texts = ["Q7: say it!!", "hello world, hello!", "Q123: !a!b!c", "The quick brown fox jumps over it."]
        ids_list = [tok(s).input_ids for s in texts]
        routed = prompt_logprobs_hf(model, ids_list)
        folded_vllm = prompt_logprobs_vllm(backend.llm, ids_list)
        result["max_abs_diff_logprob_folded"] = max_diff(routed, folded_vllm)

        # the same weights without the fold: TRL's own stream, gradroute's names dropped
        unfolded = [(n, p.detach().clone()) for n, p in VLLMGeneration._iter_named_params(backend)
                    if "gradroute_" not in n]
        em = engine_model(backend)
        for n, p in unfolded:
            em.load_weights([(n, p)])
        backend.llm.reset_prefix_cache()
        unfolded_vllm = prompt_logprobs_vllm(backend.llm, ids_list)
        result["max_abs_diff_logprob_unfolded"] = max_diff(routed, unfolded_vllm)
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        plain.load_state_dict(dict(unfolded), strict=True)
        result["max_abs_diff_unfolded_vllm_vs_plain_hf"] = max_diff(prompt_logprobs_hf(plain, ids_list), unfolded_vllm)

        # TRL's unpatched stream as is: vLLM has no gradroute_* parameters
        gname, gp = next((n, p) for n, p in VLLMGeneration._iter_named_params(backend) if "gradroute_" in n)
        try:
            em.load_weights([(gname, gp)])
            result["unfiltered_gradroute_name"] = f"{gname}: accepted by load_weights"
        except Exception as e:  # noqa: BLE001
            result["unfiltered_gradroute_name"] = f"{gname}: {type(e).__name__}: {str(e)[:200]}"

        backend.sync_weights()  # folded again
        result["max_abs_diff_logprob_refolded"] = max_diff(routed, prompt_logprobs_vllm(backend.llm, ids_list))
        handle.detach()
    result["total_s"] = round(time.time() - T0, 1)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
