"""``python -m merging emr-extract MERGED_DIR --task NAME_OR_INDEX OUT_DIR [--base PATH]`` and
``python -m merging emr-info MERGED_DIR``: the command line over ``merging.emr_store``.
"""

from __future__ import annotations

import argparse


def _resolver(args: argparse.Namespace):
    try:
        from .hub import hub_resolver
    except ImportError:
        return None
    return hub_resolver(token=getattr(args, "token", None))


def cmd_emr_extract(args: argparse.Namespace) -> int:
    from .emr_store import extract_task  # torch and the engine, loaded when the command runs

    result = extract_task(args.merged_dir, args.task, args.out_dir, base=args.base, overwrite=args.overwrite,
                          max_shard_size=args.max_shard_size, resolver=_resolver(args))
    print(f"task {result.task} ({result.model}, λ = {result.rescaler:.6g}): {result.tensors} tensors "
          f"({result.bytes_written / 1e9:.3f} GB) written to {result.out_dir} on the base {result.base}")
    return 0


def cmd_emr_info(args: argparse.Namespace) -> int:
    from .emr_store import describe, load_emr

    with load_emr(args.merged_dir) as emr:
        print(describe(emr))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("emr-extract", help="write one task of an EMR merge as an ordinary checkpoint")
    p.add_argument("merged_dir", help="the folder an `emr` or `emr_rescale` merge wrote")
    p.add_argument("--task", required=True, help="the task: its model reference as in the config, or its index")
    p.add_argument("out_dir", help="the folder to create; it appears only when the extraction succeeds")
    p.add_argument("--base", default=None, help="the base checkpoint (default: the one recorded in emr.json)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=cmd_emr_extract)

    p = subparsers.add_parser("emr-info", help="an EMR merge's tasks, rescalers and storage")
    p.add_argument("merged_dir")
    p.set_defaults(func=cmd_emr_info)
