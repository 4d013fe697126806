#!/usr/bin/env bash
# The GPU checks of #18 in one go, on a machine with a CUDA device: installs what the tests need without
# touching torch, runs tests/test_cuda.py and the benchmark's GPU rows, and writes everything to one file.
#
#   tools/gpu_check.sh [results file]        (default: gpu-check-<UTC time>.txt in the repository root)
#
# torch: pyproject.toml pins torch==2.13.0. A CUDA build preinstalled on the box ("2.13.0+cu128" and the like)
# satisfies that pin (PEP 440 ignores the local "+cu..." label), and it is also written into a pip constraints
# file, so `pip install -e '.[test,bench]'` keeps it. A torch of another version is refused (exit 2) rather than
# replaced: install torch 2.13.0 for the box's CUDA first. The bench extra comes along (psutil). With no torch at all, torch==2.13.0 is installed
# from the configured index (PyPI's Linux x86_64 wheel is a CUDA build). If pip cannot reach an index
# (an offline box) and the test requirements are already importable, the checks run anyway.
#
# GPU_CHECK_NO_INSTALL=1 skips the pip step (a box already set up).
#
# Exit status: 0 all passed, 1 a test or the benchmark failed, 2 torch mismatch, 3 no CUDA device.
set -u
cd "$(dirname "$0")/.."
RESULTS=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ).txt}
PY=${PYTHON:-python}
log() { echo "$*" | tee -a "$RESULTS"; }
: > "$RESULTS"

PIN=$("$PY" - <<'EOF'
import re, pathlib
text = pathlib.Path("pyproject.toml").read_text()
print(re.search(r'"torch==([^"]+)"', text).group(1))
EOF
)
HAVE=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
log "== gpu_check $(date -u +%FT%TZ); pyproject pins torch==$PIN; installed: ${HAVE:-none}"
if [ -z "$HAVE" ]; then
    "$PY" -m pip install "torch==$PIN" 2>&1 | tail -3 | tee -a "$RESULTS"
    HAVE=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
    [ -n "$HAVE" ] || { log "torch could not be installed"; exit 2; }
elif [ "${HAVE%%+*}" != "$PIN" ]; then
    log "installed torch $HAVE is not the pinned $PIN: refusing to replace it (install torch $PIN for this CUDA first)"
    exit 2
fi
CONSTRAINTS=$(mktemp)
echo "torch==$HAVE" > "$CONSTRAINTS"
if [ -n "${GPU_CHECK_NO_INSTALL:-}" ]; then
    log "GPU_CHECK_NO_INSTALL set: no pip install"
elif ! (set -o pipefail; "$PY" -m pip install -q -c "$CONSTRAINTS" -e '.[test,bench]' 2>&1 | tail -5 | tee -a "$RESULTS"); then
    log "pip install -e '.[test]' failed (offline?); continuing with what is installed"
fi
if ! "$PY" -c "import graftlib.passes.lora" 2>/dev/null; then  # not installed: the worktree layout instead
    [ -e graftlib/passes ] || ln -s ../passes graftlib/passes
    [ -e graftlib/tools ] || ln -s ../tools graftlib/tools
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
AFTER=$("$PY" -c "import torch; print(torch.__version__)")
[ "$AFTER" = "$HAVE" ] || { log "torch changed from $HAVE to $AFTER during the install: stopping"; exit 2; }
"$PY" - <<'EOF' 2>&1 | tee -a "$RESULTS"
import importlib, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "pytest", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "missing:", type(exc).__name__, exc)
EOF
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { log "no CUDA device"; exit 3; }

STATUS=0
log "== tests/test_cuda.py (GRAFTLIB_TEST_DEVICE=cuda)"
GRAFTLIB_TEST_DEVICE=cuda "$PY" -m pytest -q -rA --durations=0 -p no:cacheprovider tests/test_cuda.py 2>&1 \
    | tee -a "$RESULTS"
[ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
log "== benchmark: GPU rows (python -m graftlib.tools.bench --only gpu)"
"$PY" -m graftlib.tools.bench --only gpu --json bench-results/gpu.json 2>&1 | tee -a "$RESULTS"
[ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
log "== done, status $STATUS; JSON rows in bench-results/gpu.json"
exit $STATUS
