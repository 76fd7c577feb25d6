"""``python -m merging bench``: how fast our merges are, against a reference measured in the same run.

- ``bench`` (``local``): synthetic llama checkpoints on the local disk, our merge against mergekit's, each in its
  own process; time, peak memory, agreement of the outputs.
- ``bench --hub`` (``hub``): the same kind of checkpoints served by the loopback Hub (``merging.hub.loopback``)
  behind shaped links; our streamed merge against the link's floor (bytes ÷ bandwidth) and against
  download-then-merge, and the sampled analysis' time and bytes.
- ``bench --device cuda`` (``gpu``): the local table with CUDA merges, and each merge's throughput against the
  host→device copy floor and against our CPU kernels.

Nothing here is imported until the command runs (``python -m merging --help`` loads no torch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..errors import MergeError

DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_ties", "emr")
HUB_METHODS = ("task_arithmetic", "ties")
DEFAULT_LINKS = ("50MB/s,100ms", "100MB/s,50ms", "300MB/s,20ms,per=100MB/s")
# (hidden, intermediate, layers, vocab, fine-tunes): base + 3 × 0.54 B locally; base + 2 × 0.12 B (0.70 GB) from the
# loopback Hub, where every run moves the bytes through a shaped link
LOCAL_SHAPE = (2048, 5632, 8, 32000, 3)
HUB_SHAPE = (1024, 2816, 4, 32000, 2)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..methods import REGISTRY
    from .local import Shape

    defaults = HUB_SHAPE if args.hub else LOCAL_SHAPE
    dims = [given if given is not None else default for given, default in
            zip((args.hidden, args.intermediate, args.layers, args.vocab, args.models), defaults)]
    shape = Shape(*dims, dtype=args.dtype)
    methods = [m.strip() for m in (args.methods or ",".join(HUB_METHODS if args.hub else DEFAULT_METHODS)).split(",")
               if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise MergeError(f"--methods: unknown method(s) {', '.join(unknown)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MergeError("bench --device cuda: no CUDA device is available on this machine")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "mergescope-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.hub:
        from ..hub.link import LinkShape
        from .hub import bench_hub, format_hub_table

        try:
            links = [LinkShape.parse(text) for text in (args.links or ";".join(DEFAULT_LINKS)).split(";")]
        except ValueError as exc:
            raise MergeError(f"--links: {exc}") from None
        report = bench_hub(shape, methods, links, args.repeat, workdir, args.sample)
        text = format_hub_table(report)
    else:
        from .local import bench, format_table

        report = bench(shape, methods, args.repeat, workdir, not args.no_mergekit, args.device)
        text = format_table(report)
        if args.device == "cuda":
            from .gpu import bench_gpu, format_gpu_table

            report["gpu"] = bench_gpu(shape, methods, args.repeat, workdir)
            text += "\n\n" + format_gpu_table(report["gpu"])
    print(text)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="time our merges against mergekit, against a shaped Hub link, or on CUDA")
    shape = p.add_argument_group("the synthetic llama checkpoints (defaults: base + 3 × 0.54 B; with --hub base + "
                                 "2 × 0.12 B)")
    shape.add_argument("--hidden", type=int, default=None)
    shape.add_argument("--intermediate", type=int, default=None)
    shape.add_argument("--layers", type=int, default=None)
    shape.add_argument("--vocab", type=int, default=None)
    shape.add_argument("--models", type=int, default=None, help="fine-tunes besides the base")
    shape.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", default=None,
                   help=f"comma-separated (default {','.join(DEFAULT_METHODS)}; with --hub {','.join(HUB_METHODS)})")
    p.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best is reported")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: also each merge's throughput against the host→device copy floor and our CPU kernels")
    p.add_argument("--hub", action="store_true",
                   help="stream from the loopback Hub behind shaped links instead of reading the local disk")
    p.add_argument("--links", default=None, metavar="SHAPES",
                   help="with --hub: link shapes separated by ';', each 'BANDWIDTH,RTT[,per=BANDWIDTH]' "
                        f"(default {';'.join(DEFAULT_LINKS)})")
    p.add_argument("--sample", type=float, default=0.05, help="with --hub: the sampled analysis' row fraction")
    p.add_argument("--workdir", default=None, help="where checkpoints and outputs go (reused between runs)")
    p.add_argument("--no-mergekit", action="store_true", help="time only our engine")
    p.add_argument("--json", default=None, help="also write the figures as JSON")
    p.set_defaults(func=cmd_bench)
