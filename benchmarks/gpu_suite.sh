#!/usr/bin/env bash
# One call on a GPU machine (no network): install fastdiff without dependencies, run the GPU tests, then the full
# `fastdiff bench`. Everything lands in $OUT (default ./gpu-results), at most 7 files:
#   suite.log  env.txt  pytest-gpu.log  bench.log  bench.json  bench.md  (+ install.log on a failed install)
# The whole script stays under 9 minutes: each section has a hard time limit, and the bench has a time budget
# below its limit (jobs that would start after it are recorded as skipped; its reports are rewritten after
# every row, so a killed bench still leaves valid JSON and markdown).
#
# Optional: wheels in $FASTDIFF_WHEELS (default benchmarks/wheels) are installed first without network, e.g.
# diffusers and its dependencies for the `diffusers` provider (see benchmarks/results/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-530}
TESTS_S=${TESTS_S:-170}
WHEELS=${FASTDIFF_WHEELS:-benchmarks/wheels}
mkdir -p "$OUT"
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/suite.log"; }
left() { echo $((TOTAL_S - (SECONDS - start))); }

log "gpu_suite: commit $(git rev-parse HEAD 2>/dev/null || echo unknown), out $OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    log "installing carried wheels from $WHEELS"
    $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl >>"$OUT/suite.log" 2>&1 || log "wheel install failed"
fi
if $PY -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    rm -f "$OUT/install.log"
    log "installed fastdiff (editable, no deps)"
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    log "pip install failed (see install.log); using PYTHONPATH=$PWD"
fi

timeout 60 $PY -m fastdiff.cli env >"$OUT/env.txt" 2>&1
log "env: $(grep -E '^ +gpu:' "$OUT/env.txt" | head -1 | sed 's/^ *//')"

log "pytest -m gpu (limit ${TESTS_S} s)"
timeout "$TESTS_S" $PY -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/pytest-gpu.log" 2>&1
rc=$?
log "pytest -m gpu: exit $rc ($(tail -1 "$OUT/pytest-gpu.log"))"

limit=$(( $(left) - 10 ))
budget=$(( limit - 90 ))  # a job started before the budget ends may still compile and capture; the limit kills it
if [ "$budget" -lt 60 ]; then budget=60; fi
log "fastdiff bench (limit ${limit} s, budget ${budget} s)"
timeout "$limit" $PY -m fastdiff.cli bench --out "$OUT" --budget-s "$budget" >"$OUT/bench.log" 2>&1
brc=$?
log "fastdiff bench: exit $brc"
log "done in $((SECONDS - start)) s"
exit $(( rc != 0 || brc != 0 ))
