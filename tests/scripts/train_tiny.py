"""A tiny routed Trainer run for the crash/resume test: ``python train_tiny.py OUT [--resume CKPT] [--hang-at N]``.

With ``--hang-at N`` it writes ``OUT/hanging`` after step N is logged and sleeps (to be SIGKILLed).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradroute as gr
from gradroute.testing import tiny_lm


class Hang(TrainerCallback):
    def __init__(self, out, at):
        self.out, self.at = Path(out), at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            (self.out / "hanging").write_text(str(state.global_step))
            time.sleep(600)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume")
    ap.add_argument("--hang-at", type=int)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, _ = tiny_lm("llama")
    ids = torch.randint(3, 100, (64, 10), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["math", "hack"] * 32})
    args = TrainingArguments(output_dir=a.out, max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, seed=0,
                             logging_steps=1, disable_tqdm=True)
    cbs = [Hang(a.out, a.hang_at)] if a.hang_at else []
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=cbs)
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(1))})
    gr.attach(trainer, sub, env_column="env", mode="gradient")
    trainer.train(resume_from_checkpoint=a.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
