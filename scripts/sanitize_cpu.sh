#!/usr/bin/env bash
# Builds fused_ce's CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer
# in a temporary copy of the repository (the in-place build, fused_ce/_C.so, is
# never touched) and runs the CPU test suite against that build.
#
#   bash scripts/sanitize_cpu.sh                          # the default selection (below)
#   SANITIZE_TESTS=tests/test_ops.py bash scripts/sanitize_cpu.sh -x
#
# Extra arguments go to pytest; a -k among them replaces the default deselection.
#
# Environment:
#   SANITIZE_TESTS  test files / node ids to run (default: DEFAULT_TESTS below)
#   SANITIZE_KEEP=1 keep the temporary directory (its path is printed)
#   SANITIZE_DIR    work in this directory instead of a fresh temporary one (kept;
#                   a second run reuses its build where the sources did not change)
#   SANITIZE_REF    build from this git revision (`git archive`) instead of the
#                   working tree (tracked + untracked, non-ignored files)
#   SANITIZE_SRC    build from this directory (a checkout or a snapshot) instead
#
# How: the extension is compiled with -fsanitize=address,undefined (setup.py,
# FUSED_CE_SANITIZE=1, CPU-only: -O1 -g, UBSan without recovery). Python and torch
# are not instrumented, so gcc's ASan/UBSan runtimes are LD_PRELOADed into the
# interpreter (the ASan runtime first, as it must be). Leak checking is off: CPython
# and torch keep allocations alive until exit by design. ASan writes its reports to
# log files, UBSan to stderr (and stops the process); pytest's output is kept and
# searched as well. Before the tests, a self-test checks that a deliberate heap
# overflow and a signed overflow in a tiny instrumented library are reported.
# Exit status: 0 clean; 1 a sanitizer report (printed) or failing tests; 2 the
# harness itself could not run (build, runtimes, self-test).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

# The whole CPU suite, minus: test_cuda_emulated.py (it JIT-builds its own,
# uninstrumented extension: minutes, and not fused_ce's kernels), the torch.compile
# cases (inductor's generated C++ is not what is under test, and compiling it under
# ASan takes minutes), the RSS-based memory tests (ASan's quarantine makes RSS
# meaningless) and the CUDA twins (a CPU-only build skips them anyway).
DEFAULT_TESTS="tests --ignore=tests/test_cuda_emulated.py"
TESTS="${SANITIZE_TESTS:-$DEFAULT_TESTS}"
DESELECT=(-k "not compile and not memory_does_not_grow and not large_gradient_buffers and not cuda")

CXX_FOR_RUNTIME="${CXX:-g++}"
LIBASAN="$("$CXX_FOR_RUNTIME" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX_FOR_RUNTIME" -print-file-name=libubsan.so)"
for lib in "$LIBASAN" "$LIBUBSAN"; do
  if [ ! -e "$lib" ]; then
    echo "sanitize_cpu: $lib not found; install gcc's sanitizer runtimes (libasan, libubsan)" >&2
    exit 2
  fi
done
LIBASAN="$(readlink -f "$LIBASAN")"
LIBUBSAN="$(readlink -f "$LIBUBSAN")"

if [ -n "${SANITIZE_DIR:-}" ]; then
  TMP="$SANITIZE_DIR"
  SANITIZE_KEEP=1
  mkdir -p "$TMP"
  rm -rf "$TMP/logs"
else
  TMP="$(mktemp -d "${TMPDIR:-/tmp}/fused_ce_sanitize.XXXXXX")"
fi
cleanup() {
  if [ "${SANITIZE_KEEP:-0}" = 1 ]; then
    echo "sanitize_cpu: kept $TMP"
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT

SRC="$TMP/src"
mkdir -p "$SRC" "$TMP/logs"
if [ -n "${SANITIZE_SRC:-}" ]; then
  (cd "$SANITIZE_SRC" && tar --exclude=./.venv --exclude=./build --exclude=./.git --exclude='*.so' \
    --exclude='__pycache__' --exclude=./.hypothesis -chf - .) | tar -x -C "$SRC"
  echo "sanitize_cpu: building $SANITIZE_SRC in $SRC"
elif [ -n "${SANITIZE_REF:-}" ]; then
  git -C "$ROOT" archive "$SANITIZE_REF" | tar -x -C "$SRC"
  echo "sanitize_cpu: building $(git -C "$ROOT" rev-parse --short "$SANITIZE_REF") in $SRC"
else
  # The working tree as git sees it: tracked and untracked files, minus ignored ones
  # (.venv, build/, *.so, caches).
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    (cd "$ROOT" && xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh) |
    tar -C "$ROOT" --null -T - -cf - | tar -x -C "$SRC"
  echo "sanitize_cpu: building the working tree in $SRC"
fi

(
  cd "$SRC"
  FUSED_CE_SANITIZE=1 FUSED_CE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py -q build_ext -b "$SRC" -t "$TMP/temp" >"$TMP/logs/build.log" 2>&1
) || {
  echo "sanitize_cpu: the sanitizer build failed; the end of its log:" >&2
  tail -40 "$TMP/logs/build.log" >&2
  exit 2
}
SO="$SRC/fused_ce/_C.so"
[ -f "$SO" ] || { echo "sanitize_cpu: $SO was not built" >&2; exit 2; }
# (grep without -q: reading all of nm's output keeps pipefail quiet)
if ! nm -D "$SO" | grep "__asan_init" >/dev/null; then
  echo "sanitize_cpu: $SO has no ASan instrumentation" >&2
  exit 2
fi
echo "sanitize_cpu: built $SO (ASan + UBSan, CPU-only)"

# ASan reports go to one log file per process (log_path; pytest may start
# subprocesses). UBSan ignores log_path for its fatal reports (with
# -fno-sanitize-recover they go to stderr, and the process exits), so stderr is
# captured and searched too. ASan's common flags (log_path) come from ASAN_OPTIONS
# even for UBSan, whose own flags come from UBSAN_OPTIONS.
ASAN_BASE="detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_odr_violation=0:alloc_dealloc_mismatch=0"
UBSAN_BASE="print_stacktrace=1:halt_on_error=1"
export ASAN_OPTIONS="$ASAN_BASE:log_path=$TMP/logs/asan"
export UBSAN_OPTIONS="$UBSAN_BASE"
REPORT_PATTERN="ERROR: AddressSanitizer|runtime error:|UndefinedBehaviorSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer"
export LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}"

# The copy's fused_ce (with the sanitizer build) comes first on the path; the
# tests run from the copy too, so nothing imports the in-place build. Check that.
loaded=$(cd "$SRC" && PYTHONPATH="$SRC" "$PY" -c 'import fused_ce._C as c; print(c.__file__)' 2>"$TMP/logs/import.err") || {
  echo "sanitize_cpu: importing the sanitizer build failed:" >&2
  cat "$TMP/logs/import.err" >&2
  exit 2
}
if [ "$(readlink -f "$loaded")" != "$(readlink -f "$SO")" ]; then
  echo "sanitize_cpu: the tests would load $loaded, not the sanitizer build $SO" >&2
  exit 2
fi
echo "sanitize_cpu: the tests load $loaded; ASan runtime $LIBASAN, UBSan runtime $LIBUBSAN"

# Self-test of the harness: a deliberate heap overflow and a signed overflow in a
# tiny instrumented library, called from the same interpreter under the same
# settings, must each produce a report where this script looks for them.
mkdir -p "$TMP/selftest"
cat >"$TMP/selftest/bug.c" <<'CEOF'
#include <stdlib.h>
int heap_overflow(int i) { int* p = malloc(4 * sizeof(int)); int v = p[i]; free(p); return v; }
int signed_overflow(int x) { return x + 2147483647; }
CEOF
env -u LD_PRELOAD "$CXX_FOR_RUNTIME" -x c -shared -fPIC -O0 -g -fsanitize=address,undefined \
  -fno-sanitize-recover=undefined "$TMP/selftest/bug.c" -o "$TMP/selftest/libbug.so"
for fn in heap_overflow signed_overflow; do
  rm -f "$TMP/selftest/"asan.* "$TMP/selftest/out.txt"
  ASAN_OPTIONS="$ASAN_BASE:log_path=$TMP/selftest/asan" \
    "$PY" -c "import ctypes, sys; ctypes.CDLL(sys.argv[1]).$fn(4)" "$TMP/selftest/libbug.so" \
    >"$TMP/selftest/out.txt" 2>&1 && { echo "sanitize_cpu: self-test: $fn did not stop the process" >&2; exit 2; }
  if ! grep -q -s -E "$REPORT_PATTERN" "$TMP/selftest/"asan.* "$TMP/selftest/out.txt"; then
    echo "sanitize_cpu: self-test failed: a deliberate $fn was not reported; the harness would miss real errors" >&2
    exit 2
  fi
done
echo "sanitize_cpu: self-test OK (a deliberate heap overflow and signed overflow are reported)"

status=0
set +e
(
  cd "$SRC"
  # shellcheck disable=SC2086
  PYTHONPATH="$SRC" "$PY" -m pytest $TESTS -q -p no:cacheprovider "${DESELECT[@]}" "$@"
) 2>&1 | tee "$TMP/logs/pytest.log"
status=${PIPESTATUS[0]}
set -e
unset LD_PRELOAD

reports=$(find "$TMP/logs" -name 'asan.*' | sort)
if [ -n "$reports" ] || grep -q -E "$REPORT_PATTERN" "$TMP/logs/pytest.log"; then
  echo "sanitize_cpu: sanitizer reports:" >&2
  for f in $reports; do
    echo "---- $f" >&2
    head -60 "$f" >&2
  done
  grep -n -E -A30 "$REPORT_PATTERN" "$TMP/logs/pytest.log" | head -80 >&2 || true
  exit 1
fi
if [ "$status" != 0 ]; then
  echo "sanitize_cpu: pytest failed (exit $status) under the sanitizers; no sanitizer report was written" >&2
  exit "$status"
fi
echo "sanitize_cpu: OK, no ASan/UBSan reports"
