#!/usr/bin/env bash
# Newcomer entry point. Creates (or reuses) ./.venv from the requirements files, then:
#   bash run.sh study [args]  the main job: the miniature INF-LLaVA study (infllava_jax/study/)
#   bash run.sh demo [args]   a one-minute tour of the model API with random weights
#   bash run.sh test [args]   the test suite (pytest; extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-}; shift || true
case "$job" in
  study|demo) reqs=requirements.txt ;;
  test) reqs=requirements-dev.txt ;;
  *) echo "usage: bash run.sh study|demo|test [args]" >&2; exit 2 ;;
esac

# (Re)install only when the requirements changed since the last install into this venv.
# --no-compile: Python compiles a module when it is first imported; compiling every installed
# file up front (pip's default) is over half of a fresh install, and most are never imported. The
# tests start many processes, so `test` compiles everything once, after the install.
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=".venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$reqs"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --no-compile -r "$reqs"
  if [ "$job" = test ]; then .venv/bin/python -m compileall -qq -j 0 .venv/lib || true; fi
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

case "$job" in
  study) exec python -m infllava_jax.study "$@" ;;
  demo) exec python -m infllava_jax.demo "$@" ;;
  # pytest exits 5 when it collects nothing, so an empty run is never green.
  test) exec python -m pytest "$@" ;;
esac
