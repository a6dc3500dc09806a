"""``gradroute adapter discard | merge | export``: act on saved adapters with plain PEFT."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import AdapterError, GradrouteError
from ._common import check_out_dir, check_saved, load_model, short


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="discard, merge or export persona adapters")
    ss = p.add_subparsers(dest="adapter_command", required=True, metavar="ACTION")

    d = ss.add_parser("discard", help="trained model minus the adapter -> the base model")
    d.add_argument("adapter", help="PEFT adapter directory written by gradroute")
    d.add_argument("--model", required=True, help="the trained model (name or path) the adapter came from")
    d.add_argument("--out", required=True, help="output model directory (new, or --force)")
    d.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    d.set_defaults(func=_discard)

    m = ss.add_parser("merge", help="base model plus the adapter -> one plain model")
    m.add_argument("adapter", help="PEFT adapter directory written by gradroute")
    m.add_argument("--model", help="base model (default: ADAPTER/base if it was saved with base='model')")
    m.add_argument("--out", required=True, help="output model directory (new, or --force)")
    m.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    m.set_defaults(func=_merge)

    e = ss.add_parser("export", help="router state from a checkpoint -> PEFT adapter")
    e.add_argument("state", help="router state directory, e.g. RUN/checkpoint-N/gradroute")
    e.add_argument("--model", help="model at that checkpoint (default: the checkpoint directory)")
    e.add_argument("--env", help="export only this environment's share")
    e.add_argument("--base", default="modules", choices=["modules", "model", "none"],
                   help="what to save next to the adapter: modules (the routed modules' base weights, "
                        "routed_base.safetensors), "
                        "model (the whole base model in ADAPTER/base) or none; default: modules")
    e.add_argument("--out", required=True, help="output adapter directory (new, or --force)")
    e.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    e.set_defaults(func=_export)


def _load(name_or_path: str, option: str = "--model") -> tuple[Any, Any]:
    return load_model(name_or_path, option)


def _save(model: Any, tok: Any, out: str) -> None:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    check_saved(path)  # save_pretrained only logs some failures: never claim a save that did not happen
    print(f"saved to {out}")


def _apply_adapter(fn: Any, model: Any, adapter: str, model_name: str) -> Any:
    """Run a PEFT operation; an adapter whose modules the model lacks is a typed error."""
    try:
        return fn()
    except GradrouteError:
        raise
    except (ValueError, KeyError, RuntimeError, AttributeError, TypeError) as e:
        raise AdapterError(
            f"the adapter {adapter} does not fit the model {model_name} ({type(e).__name__}: {short(e)}).",
            "pass --model with the model the adapter was saved from (same architecture and sizes; "
            "see base_model_name_or_path in its adapter_config.json).") from None


def _discard(args: argparse.Namespace) -> int:
    from ..integrations.peft import read_adapter_meta, subtract_adapter

    read_adapter_meta(args.adapter)
    check_out_dir(args.out, args.force)
    model, tok = _load(args.model)
    _save(_apply_adapter(lambda: subtract_adapter(model, args.adapter), model, args.adapter, args.model), tok, args.out)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from ..integrations.peft import read_adapter_meta

    read_adapter_meta(args.adapter)
    check_out_dir(args.out, args.force)
    base = args.model or str(Path(args.adapter) / "base")
    if not args.model and not (Path(base) / "config.json").is_file():
        raise AdapterError(f"{args.adapter} has no saved base model.", "pass --model BASE.")
    model, tok = _load(base)
    merged = _apply_adapter(lambda: PeftModel.from_pretrained(model, args.adapter).merge_and_unload(),
                            model, args.adapter, base)
    _save(merged, tok, args.out)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..router import GradientRouter

    state = Path(args.state)
    if not state.is_dir():
        from ..errors import FileFormatError

        raise FileFormatError(f"{state} is not a directory.",
                              "pass a checkpoint's gradroute/ directory, e.g. RUN/checkpoint-N/gradroute.")
    check_out_dir(args.out, args.force)
    model_path = args.model or str(state.parent)
    if not args.model and not (state.parent / "config.json").is_file():
        raise AdapterError(f"{state.parent} is not a model checkpoint.", "pass --model with the model at that step.")
    model, _ = _load(model_path)
    from .. import _io

    if (state / _io.MANIFEST_NAME).is_file():
        _io.verify_manifest(state)
    router = GradientRouter.from_state(model, state)
    if args.env is not None and args.env not in router.envs:
        raise AdapterError(f"--env {args.env!r} is not an environment of this run (it has {router.envs}).",
                           "pass one of those names, or leave --env out for the whole adapter.")
    from ..integrations.peft import save_adapter

    save_adapter(router, args.out, env=args.env, base=args.base)
    print(f"exported adapter (steps={router.steps}, norm={router.adapter_norm(args.env).total:.4g}) to {args.out}")
    return 0
