#!/usr/bin/env bash
# Build mamba-ssm's and causal-conv1d's CUDA kernels from their PyPI sdists, for sm_90 (H100 / H200) only,
# on an offline machine, and install them into the current Python environment.
#
# usage:  scripts/build_mamba_kernels.sh SDIST_DIR [OUT_DIR]
#
#   SDIST_DIR  a folder carried to the machine holding  mamba_ssm-<v>.tar.gz  and  causal_conv1d-<v>.tar.gz
#              (their sdists; the newest version of each found there is used), optionally with wheels of
#              the pure-python pieces the install needs if they are missing there: einops, ninja, wheel.
#              Fetch them on a machine with PyPI access with, e.g.:
#                MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps \
#                    --no-build-isolation --no-binary :all: mamba-ssm==2.2.6.post3 causal-conv1d==1.5.2 -d DIR
#                pip download --no-deps einops ninja wheel -d DIR
#              Not every sdist carries the CUDA sources: mamba-ssm 2.2.4 and causal-conv1d 1.5.0.post8 are
#              python-only, mamba-ssm 2.2.6.post3 / 2.3.x and causal-conv1d 1.5.2 / 1.6.x have csrc/.
#   OUT_DIR    where the unpacked sources, build logs and built wheels go (default: ./build/mamba_kernels);
#              the wheels can be reinstalled later with  pip install --no-index --no-deps OUT_DIR/wheels/*.whl
#
# Why the setup.py patch: both setup.py files hard-code -gencode for sm_53 ... sm_121 and hand them to nvcc
# through extra_compile_args, which makes torch's cpp_extension ignore TORCH_CUDA_ARCH_LIST entirely. We
# filter the nvcc flag list down to  -gencode arch=compute_90,code=sm_90  right before the extension is
# declared, which cuts the build time by roughly the number of architectures (about 10x).
#
# Why MAMBA_FORCE_BUILD / CAUSAL_CONV1D_FORCE_BUILD: otherwise their bdist_wheel first tries to download a
# prebuilt wheel from GitHub; offline that raises URLError, which they do not catch (only HTTPError).
#
# Never installs or upgrades torch: every pip call is --no-deps --no-index --no-build-isolation, so the
# build compiles against the torch already installed (it must be a CUDA build whose major CUDA version
# matches nvcc's).
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[build_mamba_kernels] $*"; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 SDIST_DIR [OUT_DIR]"
SDIST_DIR=$(cd "$1" && pwd) || die "no such folder: $1"
OUT_DIR=${2:-build/mamba_kernels}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-python}
PIP=("$PYTHON" -m pip)
SCRIPT_START=$(date +%s)

# ---- find the sdists --------------------------------------------------------------------------------------
newest() {  # newest version of a sdist pattern in SDIST_DIR (version sort), or nothing
    ls -1 "$SDIST_DIR"/$1 2>/dev/null | sort -V | tail -n 1
}
MAMBA_SDIST=$(newest 'mamba_ssm-*.tar.gz')
CONV_SDIST=$(newest 'causal_conv1d-*.tar.gz')
[[ -n "$MAMBA_SDIST" ]] || die "no mamba_ssm-*.tar.gz in $SDIST_DIR"
[[ -n "$CONV_SDIST" ]] || die "no causal_conv1d-*.tar.gz in $SDIST_DIR"
for sdist in "$MAMBA_SDIST" "$CONV_SDIST"; do
    listing=$(tar tzf "$sdist")  # (not piped into grep -q: with pipefail, tar's SIGPIPE would fail the test)
    grep -q '/csrc/.*\.cu$' <<<"$listing" \
        || die "$(basename "$sdist") has no CUDA sources (csrc/*.cu): python-only sdist, use another version"
done
log "mamba-ssm sdist:     $(basename "$MAMBA_SDIST")"
log "causal-conv1d sdist: $(basename "$CONV_SDIST")"

# ---- toolchain checks ------------------------------------------------------------------------------------
if [[ -z "${CUDA_HOME:-}" ]]; then
    # torch would guess dirname(dirname(which nvcc)), wrong when nvcc is a wrapper (e.g. /usr/local/bin/nvcc):
    # take the first candidate that really is a toolkit (has include/cuda.h) and export it for the build
    for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")" \
                /usr/local/cuda /usr/local/cuda-*; do
        if [[ -x "$cand/bin/nvcc" && -f "$cand/include/cuda.h" ]]; then CUDA_HOME=$cand; break; fi
    done
fi
[[ -n "${CUDA_HOME:-}" && -f "$CUDA_HOME/include/cuda.h" ]] || die "no CUDA toolkit found: set CUDA_HOME"
export CUDA_HOME
[[ -x "$CUDA_HOME/bin/nvcc" ]] || die "nvcc not found (set CUDA_HOME; looked in $CUDA_HOME/bin/nvcc)"
export PATH="$CUDA_HOME/bin:$PATH"
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
log "nvcc $NVCC_VERSION at $CUDA_HOME"

TORCH_INFO=$("$PYTHON" - <<'EOF'
import torch
cap = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
print(torch.__version__, torch.version.cuda or "none", "%d.%d" % cap if cap else "nogpu")
EOF
) || die "cannot import torch with $PYTHON"
read -r TORCH_VERSION TORCH_CUDA GPU_CAP <<<"$TORCH_INFO"
log "torch $TORCH_VERSION (CUDA $TORCH_CUDA), GPU compute capability: $GPU_CAP"
[[ "$TORCH_CUDA" != none ]] || die "torch $TORCH_VERSION is a CPU build: the kernels need a CUDA build of torch"
[[ "${TORCH_CUDA%%.*}" == "${NVCC_VERSION%%.*}" ]] \
    || die "nvcc $NVCC_VERSION and torch's CUDA $TORCH_CUDA differ in major version: cpp_extension refuses that"
[[ "$GPU_CAP" == 9.0 || "$GPU_CAP" == nogpu ]] \
    || log "warning: this GPU is sm_${GPU_CAP/./}, the kernels are built for sm_90 only and will not run on it"

# build-time python pieces: from the environment, else from wheels carried in SDIST_DIR
for mod_pkg in "wheel:wheel" "ninja:ninja" "einops:einops" "packaging:packaging" "setuptools:setuptools"; do
    mod=${mod_pkg%%:*}; pkg=${mod_pkg##*:}
    if ! "$PYTHON" -c "import setuptools, $mod" 2>/dev/null; then
        if ls "$SDIST_DIR"/"$pkg"-*.whl >/dev/null 2>&1; then
            log "installing $pkg from $SDIST_DIR"
            "${PIP[@]}" install --no-index --no-deps --find-links "$SDIST_DIR" "$pkg"
        elif [[ "$mod" == ninja ]]; then
            command -v ninja >/dev/null || log "warning: no ninja: the build falls back to one file at a time (much slower)"
        else
            die "python module '$mod' missing and no $pkg-*.whl in $SDIST_DIR"
        fi
    fi
done
"$PYTHON" -c "import triton" 2>/dev/null \
    || log "warning: triton is not importable: mamba-ssm's Triton kernels (Mamba-2 SSD, decode step) will not load"

# ---- build settings --------------------------------------------------------------------------------------
NPROC=$(nproc)
MEM_GB=$(awk '/MemTotal/ {print int($2 / 1048576)}' /proc/meminfo)
# each nvcc job of these templates can take ~3-4 GB (and runs 4 threads via --threads 4)
DEFAULT_JOBS=$(( NPROC < MEM_GB / 4 ? NPROC : MEM_GB / 4 ))
(( DEFAULT_JOBS >= 1 )) || DEFAULT_JOBS=1
export MAX_JOBS=${MAX_JOBS:-$DEFAULT_JOBS}
export TORCH_CUDA_ARCH_LIST="9.0"      # for any flag-less extension; the patched flags below are what counts
export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
unset MAMBA_SKIP_CUDA_BUILD CAUSAL_CONV1D_SKIP_CUDA_BUILD
log "MAX_JOBS=$MAX_JOBS (nproc $NPROC, ${MEM_GB} GB RAM)"

# ---- unpack and patch setup.py to sm_90 only -------------------------------------------------------------
patch_setup() {  # $1: unpacked source dir
    "$PYTHON" - "$1/setup.py" <<'EOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
MARK = "# --- build_mamba_kernels.sh: sm_90 only ---"
if MARK in src:
    sys.exit(0)
m = re.search(r"^([ \t]*)ext_modules\.append\(", src, flags=re.M)
if m is None:
    sys.exit(f"{path}: no 'ext_modules.append(' line to patch before; setup.py layout changed")
ind = m.group(1)
patch = f'''{ind}{MARK}
{ind}def _sm90_only(flags):
{ind}    out, i = [], 0
{ind}    while i < len(flags):
{ind}        f = flags[i]
{ind}        if f in ("-gencode", "--generate-code") and i + 1 < len(flags):
{ind}            if flags[i + 1].replace(" ", "") == "arch=compute_90,code=sm_90":
{ind}                out += [f, flags[i + 1]]
{ind}            i += 2
{ind}            continue
{ind}        if not f.startswith(("-gencode=", "--generate-code=")):
{ind}            out.append(f)
{ind}        i += 1
{ind}    if "arch=compute_90,code=sm_90" not in out:
{ind}        out += ["-gencode", "arch=compute_90,code=sm_90"]
{ind}    return out
{ind}extra_compile_args["nvcc"] = _sm90_only(extra_compile_args["nvcc"])
{ind}print("nvcc arch flags:", [f for f in extra_compile_args["nvcc"] if "arch" in f or "gencode" in f], flush=True)
'''
src = src[: m.start()] + patch + src[m.start():]
open(path, "w").write(src)
EOF
    grep -q "build_mamba_kernels.sh: sm_90 only" "$1/setup.py" || die "patching $1/setup.py failed"
}

SRC_DIR="$OUT_DIR/src"
WHEEL_DIR="$OUT_DIR/wheels"
mkdir -p "$SRC_DIR" "$WHEEL_DIR"

build_one() {  # $1: sdist, $2: label
    local sdist=$1 label=$2 name dir start end logf
    name=$(basename "$sdist" .tar.gz)
    dir="$SRC_DIR/$name"
    rm -rf "$dir"
    tar xzf "$sdist" -C "$SRC_DIR"
    [[ -d "$dir" ]] || die "unpacking $sdist did not give $dir"
    patch_setup "$dir"
    logf="$OUT_DIR/$label.build.log"
    log "building $name for sm_90 (log: $logf) ..."
    start=$(date +%s)
    if ! "${PIP[@]}" wheel --no-index --no-deps --no-build-isolation -v -w "$WHEEL_DIR" "$dir" >"$logf" 2>&1; then
        tail -n 60 "$logf" >&2
        die "building $name failed (full log: $logf)"
    fi
    end=$(date +%s)
    grep -m1 "nvcc arch flags:" "$logf" | sed "s/^/[build_mamba_kernels]   /" || true
    grep -q "code=sm_80\|code=sm_100\|code=sm_75" "$logf" \
        && log "warning: other architectures still appear in the nvcc command lines of $logf"
    BUILD_SECONDS[$label]=$(( end - start ))
    log "built $name in $(( end - start )) s"
}

declare -A BUILD_SECONDS
build_one "$CONV_SDIST" causal_conv1d
build_one "$MAMBA_SDIST" mamba_ssm

log "installing the wheels (--no-deps: torch is left alone)"
CONV_WHEEL=$(ls -t "$WHEEL_DIR"/causal_conv1d-*.whl | head -n 1)
MAMBA_WHEEL=$(ls -t "$WHEEL_DIR"/mamba_ssm-*.whl | head -n 1)
"${PIP[@]}" install --no-index --no-deps --force-reinstall "$CONV_WHEEL" "$MAMBA_WHEEL" 2>&1 | tail -n 2
log "wheels kept for reuse: $CONV_WHEEL $MAMBA_WHEEL"

# ---- check what was built ----------------------------------------------------------------------------------
"$PYTHON" - <<'EOF'
import importlib, torch
for ext in ("causal_conv1d_cuda", "selective_scan_cuda"):
    mod = importlib.import_module(ext)
    print(f"[build_mamba_kernels] {ext}: {mod.__file__}")
import causal_conv1d  # noqa: F401
print("[build_mamba_kernels] torch", torch.__version__, "sees", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
if command -v cuobjdump >/dev/null || [[ -x "$CUDA_HOME/bin/cuobjdump" ]]; then
    CUOBJDUMP=$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")
    SO=$("$PYTHON" -c "import selective_scan_cuda; print(selective_scan_cuda.__file__)")
    log "architectures in selective_scan_cuda: $("$CUOBJDUMP" --list-elf "$SO" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
fi
# from the repo root, the harness' own view of the kernels
if [[ -f models/ops/dispatch.py ]]; then
    "$PYTHON" -c "from models.ops import dispatch; print('[build_mamba_kernels] dispatch.kernel_status():', dispatch.kernel_status())" || true
fi

SCRIPT_END=$(date +%s)
log "build time: causal-conv1d ${BUILD_SECONDS[causal_conv1d]} s, mamba-ssm ${BUILD_SECONDS[mamba_ssm]} s," \
    "whole script $(( SCRIPT_END - SCRIPT_START )) s (MAX_JOBS=$MAX_JOBS)"
