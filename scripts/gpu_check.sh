#!/usr/bin/env bash
# Run `albef-ds gpu-check` on a lent GPU machine whose image has torch, transformers, timm,
# tensorboard and pyarrow but neither deepspeed nor mosaicml-streaming: install the wheels
# carried in WHEELS (offline: --no-index --no-deps), check that everything imports, then run
# the check from this checkout (no install of albef-ds itself: PYTHONPATH=repo root).
#
#   scripts/gpu_check.sh [--wheels DIR] [--out DIR] [gpu-check options...]
#   WHEELS=.whl OUT_DIR=$OUT scripts/gpu_check.sh          # in one `device` run (docs/gpu.md)
#   PYTHON=/work/venv/bin/python scripts/gpu_check.sh --no-install --dry-run --out /tmp/gc   # here (CPU)
#
# Building the wheels (here, where pip reaches PyPI; the machine runs Python 3.12 on x86-64).
# DeepSpeed publishes a source archive only: `pip wheel` builds a pure-Python wheel from it
# (its CUDA ops, FusedAdam included, are compiled at first use with the image's nvcc and ninja):
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl/
#   pip download --no-deps -d .whl/ mosaicml-streaming==0.13.0 hjson==3.1.0 catalogue==2.0.10 \
#       python-snappy==0.7.3 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl/ pydantic-core==2.50.5 brotli==1.2.1 cramjam==2.14.0 zstd==1.5.7.2
# Those are what `import deepspeed, streaming` and albef_ds's reader load beyond the image
# (einops, msgpack, ninja, psutil, py-cpuinfo, xxhash, pyyaml are there already; streaming's
# cloud clients -- boto3, azure, google-cloud, oci, paramiko -- are imported only for remote
# paths, which the check does not use). Versions: the ones this project's venv has.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$REPO/.whl}"
OUT_DIR="${OUT_DIR:-$REPO/gpu_check}"
SITE="${SITE:-/tmp/albef_site}"
PYTHON="${PYTHON:-python3}"
INSTALL=1
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ "$INSTALL" = 1 ]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check.sh: no wheels in $WHEELS (build them as the comment at the top of this script says," \
         "or pass --no-install where deepspeed and streaming are installed)" >&2
    exit 2
  fi
  # --target: the image's site-packages stays as it is (its torch must not be replaced)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# A missing wheel shows here as one named module, not as a traceback minutes into the check.
"$PYTHON" - <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "deepspeed", "streaming", "transformers", "timm", "tensorboard", "pyarrow", "yaml",
             "albef_ds.data.dataset", "albef_ds.train.trainer"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name}: {type(e).__name__}: {e}")
if missing:
    print("gpu_check.sh: cannot import\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(2)
EOF

cd "$REPO"
exec "$PYTHON" -m albef_ds gpu-check --out "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"}
