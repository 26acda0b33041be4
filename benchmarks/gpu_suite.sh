#!/usr/bin/env bash
# The GPU suite: at most TOTAL_S seconds (default 300) in two stages, each under `timeout`, writing into $OUT
# (default ./gpu-results) as it goes, 8 files (the most a device call brings back):
#   suite.log  env.txt  pytest-gpu-ops.log  pytest-gpu-sample.log  pytest-gpu.log  bench.log  bench.json  bench.md
# Stage 1 (at most STAGE1_S, default 120 s): the environment (nvidia-smi, versions, `fastdiff env`), beside the `gpu`
#   tests that prove each fast path correct, in three pytest processes at once (their Triton and Inductor
#   compiling is CPU-bound, and the machine has cores to spare): the ops against the reference at real sizes
#   (tests/ops, pytest-gpu-ops.log), the fast sampling paths (graphed samples equal to ungraphed, compiled ones
#   to compiled: test_accel.py's sampler tests, pytest-gpu-sample.log) and the rest (the compiled and graphed
#   train step equal to eager, `fastdiff train`'s fast path, attention, ADD under capture; pytest-gpu.log). Each
#   log names every test as it ends (-v), so a timeout still shows which passed. Beside them, at low priority,
#   stage 2's compiles start early (PREWARM=1, the default): `fastdiff bench` on stage 2's jobs, its headline op
#   rows first, with only the compiled providers (fastdiff, torch-compile; op rows keep all theirs) and one
#   round, so that Inductor's, AOTAutograd's and Triton's
#   on-disk caches hold stage 2's graphs when it compiles them again (on a CPU a warm cache cut a sampler's
#   compile from 41 s to 6 s and a training step's from 55 s to 2 s: README, "CPU defaults"). It is stopped when
#   the tests end; suite.log gets its warm-up lines, the cold compile times.
# Stage 2 (the rest, less a margin): `fastdiff bench` on the GPU, headline rows first (see fastdiff/bench/suite.py:
#   the GroupNorm+SiLU (NCHW and channels_last) and sampler-step bandwidth rows, whose kernels stage 1 compiled;
#   mnist sampling at batch 64, cifar10-ddpm training at bf16, DDPM-1000 at batch 1024 on 20 timed steps,
#   extrapolated and labelled so; diffusers at the same settings beside fastdiff again, then the rest). Its time
#   budget ends before the stage's limit so a job started late can still compile; once the budget is spent, a job
#   skips the providers it has not yet compiled and times the ones it has (fastdiff is compiled before the
#   torch-compile baseline). A job's rows come once its providers
#   are timed, bench.log has a line as each provider's warm-up (compile, capture) ends, and the reports are
#   rewritten after every row, so a killed bench still leaves valid JSON and markdown. Their last section, the
#   speed targets met or not by this run's rows (fastdiff/bench/targets.py), is copied into suite.log.
# No network: wheels carried in $FASTDIFF_WHEELS (default .whl, else benchmarks/wheels) are installed first with
#   --no-deps (diffusers 0.42.1 for the diffusers rows; see benchmarks/results/README.md);
#   without diffusers those rows say "skipped: diffusers is not installed".
# FASTDIFF_SUITE_DRY=1 (or --dry-run) runs the same stages on the CPU at CPU size (`bench --quick --presets digits`),
#   to check the script's plumbing without a GPU (tests/test_bench.py). FASTDIFF_NATIVE=1 builds fastdiff._C
#   (CPU and CUDA kernels; needs cmake and nvcc) inside stage 1's time, so its `gpu` tests and rows run too.
set -uo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--dry-run" ] && FASTDIFF_SUITE_DRY=1
DRY=${FASTDIFF_SUITE_DRY:-0}
OUT=${OUT:-$PWD/gpu-results}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-300}
STAGE1_S=${STAGE1_S:-$(( TOTAL_S * 2 / 5 < 120 ? TOTAL_S * 2 / 5 : 120 ))}
MARGIN_S=${MARGIN_S:-$(( TOTAL_S / 30 > 2 ? TOTAL_S / 30 : 2 ))}  # kept back for the last log lines
mkdir -p "$OUT"
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/suite.log"; }
until_s() { local n=$(( $1 - (SECONDS - start) )); echo $(( n > 1 ? n : 1 )); }  # seconds left before mark $1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then DEVICE=cpu; BENCH_ARGS=(--quick --presets digits); else DEVICE=cuda; BENCH_ARGS=(); fi

log "gpu_suite: commit $(git rev-parse HEAD 2>/dev/null || echo "${FASTDIFF_COMMIT:-unknown} (FASTDIFF_COMMIT; no .git)")," \
    "out $OUT, total ${TOTAL_S} s," \
    "stage 1 ${STAGE1_S} s, device $DEVICE$([ "$DRY" = 1 ] && echo ' (dry run)')"

# ---- stage 1: environment and correctness (ends at STAGE1_S) ----
log "stage 1: environment"
# without a GPU the gpu tests skip and pytest exits 0: stop at once, saying why (one torch import, ~3 s)
if [ "$DRY" != 1 ] && ! timeout -k 2 60 $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    { echo "## nvidia-smi"; timeout 20 nvidia-smi 2>&1; } >"$OUT/env.txt" 2>&1
    log "CUDA is not available to $PY (torch without CUDA, or no GPU: env.txt has nvidia-smi's output); stopping"
    exit 1
fi
WHEELS=${FASTDIFF_WHEELS:-$( [ -d .whl ] && echo .whl || echo benchmarks/wheels )}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/fastdiff-site
    if timeout -k 2 "$(until_s "$STAGE1_S")" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$WHEELS"/*.whl >"$OUT/wheels.log" 2>&1; then
        export PYTHONPATH=$PYTHONPATH:$site  # after the checkout; before site-packages, like every PYTHONPATH entry
        log "installed carried wheels from $WHEELS: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
    else
        log "carried wheels failed to install; pip said: $(tail -5 "$OUT/wheels.log")"
    fi
    rm -f "$OUT/wheels.log"  # the eight files above are all a device call brings back
fi
{
    echo "## nvidia-smi"
    timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo "## python"
    timeout -k 2 "$(until_s "$STAGE1_S")" $PY -c 'import sys, torch, triton; print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
    timeout -k 2 "$(until_s "$STAGE1_S")" $PY -c 'import diffusers; print("diffusers", diffusers.__version__)' 2>&1 \
        | tail -1
    echo "## fastdiff env"
    timeout -k 2 "$(until_s "$STAGE1_S")" $PY -m fastdiff env 2>&1
} >"$OUT/env.txt" 2>&1 &
env_pid=$!  # beside the build and the tests: three Pythons importing torch, one way, ~10 s of stage 1
if [ "${FASTDIFF_NATIVE:-0}" = 1 ]; then
    log "building fastdiff._C"
    timeout -k 5 "$(until_s "$STAGE1_S")" sh -c "cmake -S . -B build/ext -DPython_EXECUTABLE=$(command -v "$PY") \
        && cmake --build build/ext -j 8" >>"$OUT/suite.log" 2>&1
    log "fastdiff._C build: exit $?"
fi
log "stage 1: pytest -m gpu, tests/ops, sampling and the rest at once (limit $(until_s "$STAGE1_S") s)"
gpu_tests() {  # $1: log name, then pytest's paths and options
    local name=$1; shift
    timeout -k 5 "$(until_s "$STAGE1_S")" $PY -m pytest -m gpu -v -p no:cacheprovider --durations=10 "$@" \
        >"$OUT/$name" 2>&1
}
SAMPLING='sampler or sample_fast_path'  # test_accel.py's sampling tests; no other file has gpu tests so named
prewarm_dir=${TMPDIR:-/tmp}/fastdiff-prewarm
if [ "${PREWARM:-1}" = 1 ]; then
    rm -rf "$prewarm_dir" && mkdir -p "$prewarm_dir"
    # Without Inductor's autotune cache: the kernel configs it would pick by timing them beside the tests would be
    # reused by stage 2 (the setting is not part of the compiled graphs' cache key, so they still hit)
    timeout -k 5 "$(until_s "$STAGE1_S")" nice -n 19 $PY -c 'import sys, torch._inductor.config as inductor
inductor.autotune_local_cache = False
from fastdiff.cli import main
sys.exit(main())' bench --device "$DEVICE" --out "$prewarm_dir" --sections ops sample train \
        --providers fastdiff torch-compile --rounds 1 --no-progress "${BENCH_ARGS[@]}" >"$prewarm_dir/bench.log" 2>&1 &
    prewarm_pid=$!
    log "stage 1: stage 2's compiles started beside the tests (nice 19)"
fi
gpu_tests pytest-gpu-ops.log tests/ops & ops_pid=$!
gpu_tests pytest-gpu-sample.log tests/test_accel.py -k "$SAMPLING" & sample_pid=$!
gpu_tests pytest-gpu.log tests --ignore=tests/ops -k "not ($SAMPLING)"
rc_paths=$?
wait $env_pid
grep -q '^diffusers ' "$OUT/env.txt" || log "diffusers did not import: its rows will be skipped with the reason" \
    "(carry wheels in .whl, see benchmarks/results/README.md)"
wait $ops_pid
rc_ops=$?
wait $sample_pid
rc_sample=$?
if [ -n "${prewarm_pid:-}" ]; then
    kill "$prewarm_pid" 2>/dev/null  # timeout passes the signal on to the bench
    wait "$prewarm_pid"
    log "stage 1: stage 2's compiles stopped (exit $?); their cold warm-up times:"
    grep -h 'warm-up (compile' "$prewarm_dir/bench.log" | sed 's/^/    /' | tee -a "$OUT/suite.log"
fi
rc=0
stage1_result() {  # $1: which tests, $2: pytest's exit status, $3: its log
    log "stage 1: pytest -m gpu ($1): exit $2$([ "$2" = 124 ] && echo ' (timed out)') ($(tail -1 "$OUT/$3"))"
    if [ "$2" != 0 ] && [ "$2" != 5 ]; then rc=$2; fi  # 5: no test collected
}
stage1_result ops $rc_ops pytest-gpu-ops.log
stage1_result sampling $rc_sample pytest-gpu-sample.log
stage1_result "training and the rest" $rc_paths pytest-gpu.log

# ---- stage 2: the headline rows (ends at TOTAL_S - MARGIN_S) ----
end2=$(( TOTAL_S - MARGIN_S ))
limit=$(until_s "$end2")
budget=$(( limit * 3 / 5 ))  # a job started before the budget ends may still compile and capture; the limit kills it
log "stage 2: fastdiff bench --device $DEVICE ${BENCH_ARGS[*]} (limit ${limit} s, budget ${budget} s)"
rm -f "$OUT/bench.json" "$OUT/bench.md"  # an earlier run's, in a reused $OUT: never copied into this suite.log
timeout -k 5 "$limit" $PY -m fastdiff bench --device "$DEVICE" --out "$OUT" --budget-s "$budget" --no-progress \
    "${BENCH_ARGS[@]}" >"$OUT/bench.log" 2>&1
brc=$?
log "stage 2: fastdiff bench: exit $brc$([ $brc = 124 ] && echo ' (timed out; bench.json holds the rows so far, if it had one)')"
[ -f "$OUT/bench.md" ] && sed -n '/^## Targets/,$p' "$OUT/bench.md" | tee -a "$OUT/suite.log"  # the last section
rm -f "$OUT"/.bench.*.tmp  # a report the limit's kill interrupted mid-write: not a ninth file
log "done in $((SECONDS - start)) s"
exit $(( (rc != 0 && rc != 5) || (brc != 0 && brc != 124) ))
