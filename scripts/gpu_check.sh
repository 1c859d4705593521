#!/usr/bin/env bash
# One prepared GPU check (harness/gpu_check.py): every GPU path of the harness exercised and timed, each step in
# its own process with its own time limit, under one budget (default 570 s), results in OUT/gpu_check.{json,md}.
#
# usage:  scripts/gpu_check.sh --out OUT [--dry-run] [--budget S] [--only STEP,...] [--wheels DIR]
#
#   --wheels DIR  install the wheels carried in DIR first (pip --no-index --no-deps: torch is never touched),
#                 e.g. numpy, safetensors, pyyaml, tokenizers, pandas, lm-eval and the data packages the eval
#                 step needs; steps whose modules are missing are skipped and say which. A mamba_ssm-*.tar.gz
#                 there is installed python-only (MAMBA_SKIP_CUDA_BUILD): Mamba-2's Triton kernels, no compiling.
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
            # a mamba-ssm sdist, python only (seconds, no compiler): its Triton kernels -- Mamba-2's SSD and the
            # decode step -- then run; Mamba-1's selective scan needs the compiled build
            # (scripts/build_mamba_kernels.sh, far longer than this check's budget)
            shopt -s nullglob
            sdists=("$2"/mamba_ssm-*.tar.gz)
            shopt -u nullglob
            if [[ ${#sdists[@]} -gt 0 ]]; then
                MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$PYTHON" -m pip install -q --no-index --no-deps \
                    --no-build-isolation "${sdists[-1]}" \
                    || echo "gpu_check: installing ${sdists[-1]} (python only) failed; Mamba runs its reference scan" >&2
            fi
            shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m harness.gpu_check "${args[@]}"
