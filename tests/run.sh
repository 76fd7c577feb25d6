#!/usr/bin/env bash
# The one command that installs what the tests need on a fresh Debian machine and runs every test.
#   bash tests/run.sh                  # everything
#   bash tests/run.sh -k mergekit -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The interpreter the tests run under (override with PYTHON=...); `python` where there is one, else python3.
PY="${PYTHON:-$(command -v python || command -v python3)}"

# torch first and pinned: anything that asks for an unpinned torch would otherwise pull a multi-GB CUDA build.
if ! "$PY" -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch").split("+")[0] != "2.13.0")' 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -r requirements.txt -r tests/requirements.txt
# The project itself, editable: `merging` and `components` import from this checkout, `mergescope` is on PATH.
"$PY" -m pip install -q --no-deps -e .

# Browser tests drive Debian's Chromium through Playwright, never a browser downloaded by Playwright itself.
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # Recommends would add mesa, udev, printing; fonts-liberation is the one worth having (text metrics).
    $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi

# Lint first: a ruff failure is cheaper to hear about than a 3-minute test run.
"$PY" -m ruff check .
exec "$PY" -m pytest -q --durations=15 tests "$@"  # the slowest tests named: CI must stay under 15 min
