"""A wall-clock budget per job: past it, a merge, an analysis or a check stops exactly as a cancel does.

A public app runs one merge at a time for everyone; without a bound, a request that is slow by design (a huge
model, a slow Hub) holds the slot for hours. The budget is checked where a cancel is (between the engine's units,
between a check's windows), so running past it raises ``OverBudget`` (a ``Cancelled``): the atomic output folder
is removed and nothing is left half-written.

Where the budget comes from, first that is set:

- the job's own argument (``time_budget=`` of ``run_merge`` / ``analyze`` / ``evaluate``; the CLIs'
  ``--time-budget SECONDS``);
- ``$MERGESCOPE_TIME_BUDGET`` (seconds);
- on a Hugging Face Space (``SPACE_ID`` set), ``SPACE_DEFAULT_S`` (30 minutes); elsewhere no budget.

0 (or a negative number) means no budget.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

from .errors import Cancelled, MergeError

ENV = "MERGESCOPE_TIME_BUDGET"
SPACE_DEFAULT_S = 1800.0


class OverBudget(Cancelled):
    """The job ran past its wall-clock budget and was stopped as a cancel is; nothing was left behind."""


def resolve(seconds: float | None = None) -> float | None:
    """The budget in seconds (None: unlimited) from the argument, else ``$MERGESCOPE_TIME_BUDGET``, else the
    Space default."""
    source = "--time-budget"
    if seconds is None:
        raw = os.environ.get(ENV, "").strip()
        if raw:
            source = f"${ENV}"
            try:
                seconds = float(raw)
            except ValueError:
                raise MergeError(f"${ENV}={raw!r} is not a number of seconds") from None
        elif os.environ.get("SPACE_ID"):
            seconds = SPACE_DEFAULT_S
    if seconds is None:
        return None
    if not math.isfinite(seconds):
        raise MergeError(f"{source} {seconds}: not a number of seconds")
    return float(seconds) if seconds > 0 else None


def with_budget(cancel: Callable[[], bool] | None, seconds: float | None, what: str) -> Callable[[], bool]:
    """A cancel check that is true when ``cancel`` is, and raises ``OverBudget`` once the budget has passed.

    The clock starts now; ``what`` names the job in the message ("the merge")."""
    limit = resolve(seconds)
    if limit is None:
        return cancel or (lambda: False)
    deadline = time.monotonic() + limit

    def check() -> bool:
        if cancel is not None and cancel():
            return True
        if time.monotonic() > deadline:
            raise OverBudget(f"{what} stopped after its time budget of {limit:g} s (--time-budget, ${ENV}); "
                             "nothing was written")
        return False

    return check


def add_flag(parser) -> None:
    """The CLIs' ``--time-budget SECONDS`` (an argparse parser)."""
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help=f"stop (as a cancel does, nothing left) after this many seconds; 0: none (default: "
                             f"${ENV}, else {SPACE_DEFAULT_S:g} s on a Space, else none)")
