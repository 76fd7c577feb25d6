"""The command line: ``python -m merging merge|inspect|analyze|evaluate|methods|emr-extract|zoo|bench ...``.

Exit codes: 0 success, 2 bad input (one ``error:`` line on stderr), 1 internal failure (a bug: traceback shown).
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import MergeError


def _progress_bar(desc: str):
    """A tqdm bar on a terminal, nothing otherwise; returns (callback, close)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, desc=desc, leave=False)

    def update(p) -> None:
        bar.total = p.bytes_total
        bar.set_description(f"{desc} [{p.phase}] {p.tensors_done}/{p.tensors_total} tensors")
        bar.n = p.bytes_done
        bar.refresh()

    return update, bar.close


def cmd_merge(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import run_merge

    config = load_config(args.config)
    if args.seed is not None:
        config = config.model_copy(update={"seed": args.seed})
    if args.allow_crimes:
        config = config.model_copy(update={"allow_crimes": True})
    progress, close = _progress_bar("merge")
    try:
        result = run_merge(config, args.out_dir, device=args.device, max_shard_size=args.max_shard_size,
                           allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=progress,
                           resolver=_resolver(args))
    finally:
        close()
    print(f"merged {result.tensors} tensors ({result.bytes_written / 1e9:.3f} GB) into {result.out_dir} "
          f"in {result.seconds:.1f} s on {result.device}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_checkpoints

    found = inspect_checkpoints(args.paths, allow_pickle=args.allow_pickle, resolver=_resolver(args))
    print(found.text)
    if not found.compatible:
        print(f"error: {', '.join(args.paths[1:])} not compatible with {args.paths[0]} (see above)", file=sys.stderr)
        return 2
    return 0


def _resolver(args: argparse.Namespace):
    """How references that are not local paths are opened: Hub repos, streamed or cached (token from HF_TOKEN)."""
    from .hub import hub_resolver

    return hub_resolver(cache=getattr(args, "hub_cache", False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging",
                                     description="Merge fine-tuned checkpoints and explain the merge.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="run a merge config into OUT_DIR")
    p.add_argument("config", help="the merge config (mergekit-compatible YAML)")
    p.add_argument("out_dir", help="the folder to create; it appears only when the merge succeeds")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--seed", type=int, default=None, help="seed for the random methods (overrides the config)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load PyTorch pickles with torch.load(weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--allow-crimes", action="store_true",
                   help="merge models of different architectures (as mergekit's flag; `allow_crimes: true`)")
    p.add_argument("--hub-cache", action="store_true",
                   help="download Hub inputs into the huggingface_hub cache instead of streaming them")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="describe checkpoints; with several, check them against the first")
    p.add_argument("paths", nargs="+", help="checkpoint folders, .safetensors files or Hub repo ids")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_inspect)

    for add in _extra_commands():
        add(sub)
    return parser


def _extra_commands():
    """Subcommands that live beside the modules they drive (analysis, EMR, zoo, bench)."""
    from . import analysis_cli, bench, emr_cli, methods_cli
    from .evaluate import cli as evaluate_cli
    from .zoo import cli as zoo_cli

    return [analysis_cli.add_commands, evaluate_cli.add_commands, emr_cli.add_commands, methods_cli.add_commands,
            zoo_cli.add_commands, bench.add_commands]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2


def run_and_exit() -> None:
    """Run the command, then end the process without the interpreter's teardown.

    Tearing down torch's modules takes about 0.4 s at exit, longer than a small merge; everything the commands
    write is closed before they return, so only the standard streams need flushing.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
