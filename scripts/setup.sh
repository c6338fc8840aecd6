#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the pinned CPU torch first,
# then erasekit and its dependencies constrained so that torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
# Debian's Chromium, for the tests that open the HTML reports in a real browser. Installed when
# missing and possible (root or passwordless sudo, apt-get); otherwise those tests fail saying so.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    AS_ROOT=""
    [ "$(id -u)" = 0 ] || AS_ROOT="sudo -n"
    $AS_ROOT apt-get update -q >/dev/null \
      && $AS_ROOT env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
      || echo "setup: could not install Debian's chromium; the report browser tests will fail until it is installed" >&2
  else
    echo "setup: Chromium is not installed and this user cannot install it (needs apt-get and root);" \
      "the report browser tests will fail until 'chromium' is installed (or ERASEKIT_CHROMIUM names a binary)" >&2
  fi
fi
