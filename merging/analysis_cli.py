"""``python -m merging analyze CONFIG [--json OUT.json] [--html REPORT.html] [--advice] [--exact | --sample FRACTION]``

``--advice`` prints what the statistics mean and which merge to try (``merging.advice``: findings, each with its
number, then a recommended method with its parameters and the reason).

Exact up to 2 GB of input (base plus fine-tunes, ``analysis.SAMPLE_THRESHOLD_BYTES``), sampled at 5% of the rows
above that; ``--exact`` forces a full pass, ``--sample`` picks the fraction. The JSON schema is
``analysis.JSON_SCHEMA_DOC``; the HTML report is one file with plotly.js inlined.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import budget
from .errors import MergeError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sample must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--sample must be in (0, 1], got {text}")
    return value


def _writable(path: str, flag: str) -> Path:
    out = Path(path)
    if not out.parent.exists():
        raise MergeError(f"{flag} {path}: the folder {out.parent} does not exist")
    return out


def _resolver(args: argparse.Namespace):
    try:
        from .hub import hub_resolver
    except ImportError:
        return None
    return hub_resolver(token=getattr(args, "token", None))


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .config import load_config

    json_path = _writable(args.json, "--json") if args.json else None
    html_path = _writable(args.html, "--html") if args.html else None
    config = load_config(args.config)
    stats = analyze(config, exact=args.exact, sample=args.sample, seed=args.seed, device=args.device,
                    allow_pickle=args.allow_pickle, resolver=_resolver(args), time_budget=args.time_budget,
                    **({} if args.spectral_elements is None else {"spectral_elements": args.spectral_elements}))
    written = []
    if json_path is not None:
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(stats, indent=1) + "\n")
        tmp.replace(json_path)
        written.append(str(json_path))
    if html_path is not None:
        from .report import write_report

        write_report(stats, html_path)
        written.append(str(html_path))
    meta = stats["meta"]
    mode = "exact" if meta["mode"] == "exact" else f"sampled {meta['sample_fraction']:.1%} of rows"
    n = len(meta["models"])
    print(f"analyzed {stats['model']['tensors']} tensors of {n} model{'s' * (n != 1)} ({mode}) in "
          f"{meta['seconds']:.1f} s (spectra {meta['spectral_seconds']:.1f} s), read {meta['bytes_read'] / 1e9:.3f} GB"
          + (f"; wrote {', '.join(written)}" if written else ""))
    for note in meta["notes"]:
        print(f"note: {note}")
    if args.advice:
        from .advice import advice_text, advise

        print(advice_text(advise(stats)))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="merge diagnostics: sign conflicts, norms, NAN, similarity, EMR",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the merge config (mergekit-compatible YAML)")
    p.add_argument("--json", metavar="OUT.json", help="where to write the statistics")
    p.add_argument("--html", metavar="REPORT.html", help="also write a standalone HTML report (opens offline)")
    p.add_argument("--advice", action="store_true",
                   help="print what the statistics mean and which merge to try (findings and a recommendation)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exact", action="store_true", help="read every element (default up to 2 GB of input)")
    mode.add_argument("--sample", type=_fraction, metavar="FRACTION",
                      help="read this fraction of each tensor's rows (default 0.05 above 2 GB of input)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--spectral-elements", type=int, default=None, metavar="N",
                   help="elements of large matrices given SVDs (default 2^25 in an exact pass, 2^23 read in a "
                        "sampled one; past it, every k-th block matrix)")
    budget.add_flag(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="load PyTorch pickles with torch.load(weights_only=True)")
    p.set_defaults(func=cmd_analyze)
