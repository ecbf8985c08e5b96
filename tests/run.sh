#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (unit + distributed gloo
# worlds + mpirun). Extra arguments go to pytest, e.g. `bash tests/run.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
