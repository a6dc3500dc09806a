"""``gradroute subspace build | inspect | import``."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FileFormatError, ProbeDataError
from ._common import check_out_dir, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("subspace", help="build, inspect or import persona subspaces")
    ss = p.add_subparsers(dest="subspace_command", required=True, metavar="ACTION")

    b = ss.add_parser("build", help="fit a subspace from probe texts, or take SAE latents")
    b.add_argument("--out", required=True, help="output subspace directory")
    b.add_argument("--model", help="HF model name or local path (needed for --texts)")
    b.add_argument("--texts", help="JSONL or CSV with 'text' (or 'prompt' and 'response') and 'label' (1/0)")
    b.add_argument("--layers", type=int, nargs="+", help="residual layers (L = output of block L)")
    b.add_argument("--method", default="diff_means", choices=["diff_means", "logistic", "pca"],
                   help="probe fit: diff_means (difference of class means), logistic (logistic-regression "
                        "weights) or pca (top-k of paired differences); default: diff_means")
    b.add_argument("--k", type=int, default=1, help="directions per layer (method pca)")
    b.add_argument("--aggregation", default="mean",
                   choices=["mean", "last", "last_prompt", "response_mean", "all"],
                   help="which tokens of each text give its activation: mean over tokens, last token, last "
                        "prompt token, mean over response tokens, or every token; default: mean")
    b.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: 16)")
    b.add_argument("--sae", help="sae-lens SAE folder (cfg.json + sae_weights.safetensors)")
    b.add_argument("--latents", type=int, nargs="+", help="SAE latent ids")
    b.add_argument("--layer", type=int, help="override the SAE's layer")
    b.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    b.set_defaults(func=_build)

    i = ss.add_parser("inspect", help="print layers, ranks, names and provenance")
    i.add_argument("path", help="subspace directory (written by `subspace build`/`import` or Subspace.save)")
    i.add_argument("--compare", help="another subspace: print per-layer overlap and principal angles")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_inspect)

    m = ss.add_parser("import", help="convert a peer's direction file into a subspace")
    m.add_argument("path", help="the peer's direction file (.pt, .npy or .safetensors)")
    m.add_argument("--format", required=True, choices=["persona_vectors", "assistant_axis", "file"],
                   help="persona_vectors: [n_layers+1, d] indexed like hidden_states (i -> layer i-1); "
                        "assistant_axis: [n_layers, d] indexed by block (i -> i); file: .npy/.safetensors")
    m.add_argument("--layers", type=int, nargs="+", help="layers to keep (gradroute convention)")
    m.add_argument("--name", help="direction name")
    m.add_argument("--model", help="check against this model (name or path)")
    m.add_argument("--out", required=True, help="output subspace directory (new, or --force)")
    m.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    m.set_defaults(func=_import)


def read_probe_file(path: str | Path) -> tuple[list[Any], list[int]]:
    """Texts and labels from JSONL/CSV rows with text|prompt+response and label."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.", "pass --texts with a JSONL or CSV file.")
    fix = ("write one JSON object per line, e.g. {\"text\": \"...\", \"label\": 1} "
           "(or a CSV with a header row text,label).")
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise FileFormatError(f"{path}:{line} is not UTF-8 text (binary data?).", "save the file as UTF-8 text; " + fix) from None
    if "\x00" in content:
        line = content[: content.index("\x00")].count("\n") + 1
        raise FileFormatError(f"{path}:{line} holds NUL bytes (binary data?).", fix)
    rows: list[Any] = []
    if path.suffix.lower() == ".csv":
        try:
            rows = list(csv.DictReader(content.splitlines()))
        except csv.Error as e:
            raise FileFormatError(f"{path} is not a readable CSV file ({e}).", fix) from None
    else:
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise FileFormatError(f"{path}:{n} is not valid JSON ({e}).", fix) from None
                if not isinstance(rec, dict):
                    raise FileFormatError(f"{path}:{n} is a JSON {type(rec).__name__} ({line.strip()[:40]}), "
                                          "not an object with 'text' and 'label'.", fix)
                rows.append(rec)
    if not rows:
        raise ProbeDataError(f"{path} holds no rows.", fix)
    texts: list[Any] = []
    labels: list[int] = []
    for n, r in enumerate(rows, 1):
        if "label" not in r:
            raise ProbeDataError(f"{path} row {n} has no 'label' column.", "add label 1 (positive) or 0 (negative).")
        try:
            lab = int(float(r["label"]))
        except (TypeError, ValueError):
            raise ProbeDataError(f"{path} row {n}: label {r['label']!r} is not 0 or 1.",
                                 "use label 1 (positive) or 0 (negative).") from None
        if isinstance(r["label"], bool) or lab not in (0, 1) or float(r["label"]) != lab:
            raise ProbeDataError(f"{path} row {n}: label {r['label']!r} is not 0 or 1.",
                                 "use label 1 (positive) or 0 (negative).")
        def text_of(key: str) -> str:
            v = r[key]
            if not isinstance(v, str):
                raise ProbeDataError(f"{path} row {n}: {key!r} is {v!r}, not a string.",
                                     f"write the {key} as a JSON string.")
            return v
        if "text" in r:
            texts.append(text_of("text"))
        elif "prompt" in r and "response" in r:
            texts.append((text_of("prompt"), text_of("response")))
        else:
            raise ProbeDataError(f"{path} row {n} has neither 'text' nor 'prompt'+'response'.",
                                 "give each row a 'text' (or 'prompt' and 'response').")
        labels.append(lab)
    return texts, labels


def _build(args: argparse.Namespace) -> int:
    from ..subspace import Subspace

    if bool(args.texts) == bool(args.sae):
        raise ConfigError("pass exactly one of --texts (probe) or --sae (SAE latents).",
                          "add --texts FILE --model M, or --sae DIR --latents N ...")
    if args.texts and not args.model:
        raise ConfigError("--texts needs --model to compute activations.", "add --model NAME_OR_PATH.")
    if args.sae and not args.latents:
        raise ConfigError("--sae needs --latents.", "add --latents ID [ID ...].")
    check_out_dir(args.out, args.force)
    texts, labels = read_probe_file(args.texts) if args.texts else ([], [])  # validate before loading
    model = None
    if args.model:
        model, tok = load_model(args.model)
        if args.texts and tok is None:
            raise ConfigError(f"--model {args.model} has no tokenizer.", "pass a model directory with tokenizer files.")
    if args.texts:
        sub = Subspace.from_probe(model, tok, texts=texts, labels=labels, layers=args.layers,
                                  method=args.method, k=args.k, aggregation=args.aggregation,
                                  batch_size=args.batch_size)
    else:
        sub = Subspace.from_sae(args.sae, args.latents, layer=args.layer, model=model)
    sub.save(args.out, overwrite=args.force)
    print(sub.summary())
    print(f"saved to {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..subspace import Subspace

    sub = Subspace.load(args.path)
    other = Subspace.load(args.compare) if args.compare else None
    if args.json:
        out: dict[str, Any] = {
            "content_hash": sub.content_hash,
            "layers": {str(L): {"d": sub.dim(L), "k": sub.rank(L), "names": list(sub.names(L))} for L in sub.layers},
            "provenance": sub.provenance.to_dict(),
        }
        if other is not None:
            out["overlap"] = {str(L): v for L, v in sub.overlap(other).items()}
            out["principal_angles_degrees"] = {str(L): sub.principal_angles(other, L, degrees=True).tolist()
                                               for L in sub.overlap(other)}
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(sub.summary())
    prov = sub.provenance.to_dict()
    extra = prov.pop("extra", {})
    for k, v in prov.items():
        if v not in (None, (), [], {}):
            print(f"  {k}: {v}")
    diag = extra.get("diagnostics")
    if diag:
        for L, d in diag.items():
            vals = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()
                             if not isinstance(v, list))
            print(f"  probe layer {L}: {vals}")
    if other is not None:
        print(f"overlap with {args.compare} (mean cos² of principal angles; random ≈ k/d):")
        for L, v in sub.overlap(other).items():
            ang = [round(a, 1) for a in sub.principal_angles(other, L, degrees=True).tolist()]
            print(f"  layer {L}: overlap {v:.4f}, principal angles (degrees; 0 = shared, 90 = orthogonal) {ang}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from ..subspace import Subspace

    check_out_dir(args.out, args.force)
    model = None
    if args.model:
        model, _ = load_model(args.model)
    if args.format == "persona_vectors":
        sub = Subspace.from_persona_vectors(args.path, args.layers, name=args.name or "persona", model=model)
    elif args.format == "assistant_axis":
        sub = Subspace.from_assistant_axis(args.path, args.layers, name=args.name or "assistant_axis", model=model)
    else:
        sub = Subspace.from_file(args.path, args.layers, names=[args.name] if args.name else None, model=model)
    sub.save(args.out, overwrite=args.force)
    print(sub.summary())
    print(f"saved to {args.out}")
    return 0
