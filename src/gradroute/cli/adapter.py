"""``gradroute adapter discard | merge | export``: act on saved adapters with plain PEFT."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import AdapterError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="discard, merge or export persona adapters")
    ss = p.add_subparsers(dest="adapter_command", required=True, metavar="ACTION")

    d = ss.add_parser("discard", help="trained model minus the adapter -> the base model")
    d.add_argument("adapter", help="PEFT adapter directory written by gradroute")
    d.add_argument("--model", required=True, help="the trained model (name or path) the adapter came from")
    d.add_argument("--out", required=True, help="directory for the discarded (base) model")
    d.set_defaults(func=_discard)

    m = ss.add_parser("merge", help="base model plus the adapter -> one plain model")
    m.add_argument("adapter", help="PEFT adapter directory written by gradroute")
    m.add_argument("--model", help="base model (default: ADAPTER/base if it was saved with base='model')")
    m.add_argument("--out", required=True, help="directory for the merged model")
    m.set_defaults(func=_merge)

    e = ss.add_parser("export", help="router state from a checkpoint -> PEFT adapter")
    e.add_argument("state", help="router state directory, e.g. RUN/checkpoint-N/gradroute")
    e.add_argument("--model", help="model at that checkpoint (default: the checkpoint directory)")
    e.add_argument("--env", help="export only this environment's share")
    e.add_argument("--base", default="modules", choices=["modules", "model", "none"],
                   help="what to save next to the adapter: modules (the routed modules' base weights, "
                        "routed_base.safetensors), "
                        "model (the whole base model in ADAPTER/base) or none; default: modules")
    e.add_argument("--out", required=True, help="directory for the PEFT adapter")
    e.set_defaults(func=_export)


def _load(name_or_path: str) -> tuple[Any, Any]:
    from ..integrations.transformers import load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(name_or_path)
    except (OSError, ValueError):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name_or_path), None


def _save(model: Any, tok: Any, out: str) -> None:
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    print(f"saved to {out}")


def _discard(args: argparse.Namespace) -> int:
    from ..integrations.peft import read_adapter_meta, subtract_adapter

    read_adapter_meta(args.adapter)
    model, tok = _load(args.model)
    _save(subtract_adapter(model, args.adapter), tok, args.out)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from ..integrations.peft import read_adapter_meta

    read_adapter_meta(args.adapter)
    base = args.model or str(Path(args.adapter) / "base")
    if not args.model and not (Path(base) / "config.json").is_file():
        raise AdapterError(f"{args.adapter} has no saved base model.", "pass --model BASE.")
    model, tok = _load(base)
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    _save(merged, tok, args.out)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..router import GradientRouter

    state = Path(args.state)
    model_path = args.model or str(state.parent)
    if not args.model and not (state.parent / "config.json").is_file():
        raise AdapterError(f"{state.parent} is not a model checkpoint.", "pass --model with the model at that step.")
    model, _ = _load(model_path)
    router = GradientRouter.from_state(model, state)
    router.save_adapter(args.out, env=args.env, base=args.base)
    print(f"exported adapter (steps={router.steps}, norm={router.adapter_norm(args.env).total:.4g}) to {args.out}")
    return 0
