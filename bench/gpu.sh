#!/usr/bin/env bash
# The GPU table of issue 21 on a CUDA machine, from the source tree, on that machine's own torch.
#
#   bench/gpu.sh                      # on the GPU machine: prints the table (<= 4 min), saves bench/out/gpu.json
#   bench/gpu.sh --allow-cpu-dry-run  # anywhere: the same script on the CPU, every line "CPU DRY RUN, NOT GPU FIGURES"
#   bench/gpu.sh --download-wheels    # here (with internet): fetch the missing pure-Python wheels into bench/wheels/
#
# The GPU machine has Python 3.12, torch with CUDA, numpy, scipy, grpcio, protobuf, matplotlib, scikit-learn,
# prometheus-client, tqdm and packaging, but no nibabel, captum, isal, pydicom or nilearn and no internet: those
# travel as wheels in bench/wheels/ (git-ignored) and are installed with pip --no-index --target into a private
# folder; instead of nilearn, its MNI152 images travel as bench/wheels/mni152.npz (NEUROEXPLAIN_TEMPLATE_FILE).
# Without CUDA the script exits with code 2 and reports nothing (unless --allow-cpu-dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=bench/wheels
# Versions as in this project's .venv; isal is the fast inflater (zlib is the fallback when it is missing).
PURE="nibabel==5.4.2 captum==0.9.0 pydicom==3.0.2"
BINARY="isal==1.9.1"
if [[ "${1:-}" == "--download-wheels" ]]; then
  mkdir -p "$WHEELS"
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" $PURE $BINARY
  PYTHONPATH="$PWD" $PY -c "from neuroexplain.template import save_template_file; save_template_file('$WHEELS/mni152.npz')"
  ls -l "$WHEELS"
  exit 0
fi
SITE=${NEUROEXPLAIN_GPU_SITE:-/tmp/neuroexplain-gpu-site}
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [[ "$PYVER" != "3.12" ]]; then
  echo "bench/gpu.sh: python $PYVER, not 3.12: the carried wheels are not installed (this python must have them)" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "bench/gpu.sh: no wheels in $WHEELS (run bench/gpu.sh --download-wheels where there is internet)" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -f "$WHEELS/mni152.npz" ]]; then export NEUROEXPLAIN_TEMPLATE_FILE="$PWD/$WHEELS/mni152.npz"; fi
export PYTHONUNBUFFERED=1 NEUROEXPLAIN_AUDIT_LOG=off
exec timeout 235 "$PY" -m bench.gpu "$@"
