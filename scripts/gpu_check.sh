#!/usr/bin/env bash
# One prepared GPU check (harness/gpu_check.py): every GPU path of the harness exercised and timed, each step in
# its own process with its own time limit, under one budget (default 570 s), results in OUT/gpu_check.{json,md}.
#
# usage:  scripts/gpu_check.sh --out OUT [--dry-run] [--budget S] [--only STEP,...] [--wheels DIR]
#
#   --wheels DIR  install the wheels carried in DIR first (pip --no-index --no-deps: torch is never touched),
#                 e.g. numpy, safetensors, pyyaml, tokenizers, pandas, lm-eval and the data packages the eval
#                 step needs; steps whose modules are missing are skipped and say which.
#   --dry-run     the same steps on the CPU with tiny shapes, GPU-only steps skipped (CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels)
            [[ $# -ge 2 && -d "$2" ]] || { echo "harness: error: --wheels: no such folder: ${2:-}" >&2; exit 2; }
            shopt -s nullglob
            wheels=("$2"/*.whl)
            shopt -u nullglob
            if [[ ${#wheels[@]} -gt 0 ]]; then
                "$PYTHON" -m pip install -q --no-index --no-deps "${wheels[@]}" \
                    || echo "gpu_check: installing the carried wheels failed; the steps that need them will say so" >&2
            fi
            shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m harness.gpu_check "${args[@]}"
