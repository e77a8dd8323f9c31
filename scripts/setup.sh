#!/usr/bin/env bash
# Set up prunebench.             scripts/setup.sh [--dev]
#
# - Installs into the active virtualenv / conda env if there is one, else into ./.venv
#   (created with --system-site-packages when the system Python already has torch, so a GPU
#   user's torch is used as it is).
# - Never replaces an installed torch: everything is installed under the constraint
#   torch==<installed version>. With no torch at all it installs torch==${PRUNEBENCH_TORCH:-2.13.0}
#   (a CPU wheel on our CI machines; set PRUNEBENCH_TORCH to choose another).
# - lmms-eval requires torchvision, whose PyPI wheel is a CUDA build that breaks
#   `from lmms_eval import evaluator` on CPU torch. lmms-eval does not need it, so on CPU torch
#   lmms-eval is installed without torchvision (and timm, which only pulls torchvision back in).
# --dev adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

plain="." with_eval=".[eval]"
for arg in "$@"; do
  case "$arg" in
    --dev) plain=".[dev]" with_eval=".[eval,dev]" ;;
    *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  py=python
else
  py=.venv/bin/python
  if [ ! -x "$py" ]; then
    if python3 -c "import torch" 2>/dev/null; then
      python3 -m venv --system-site-packages .venv
    else
      python3 -m venv .venv
    fi
  fi
fi
pip=("$py" -m pip install --disable-pip-version-check -q)
probe=("$py" -W ignore::UserWarning -c)  # torch warns about a missing NumPy until the project's deps are in

if "${probe[@]}" "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("${probe[@]}" 'import torch; print(torch.__version__)')"
else
  echo "setup: installing torch==${PRUNEBENCH_TORCH:-2.13.0}"
  "${pip[@]}" "torch==${PRUNEBENCH_TORCH:-2.13.0}" numpy
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"${probe[@]}" "import torch; print('torch==' + torch.__version__)" > "$constraints"

if "${probe[@]}" "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "setup: CUDA torch: installing $with_eval as declared"
  "${pip[@]}" -c "$constraints" -e "$with_eval"
else
  echo "setup: CPU torch: installing $plain, then lmms-eval without torchvision and timm (torchvision's PyPI"
  echo "       wheel is a CUDA build that breaks lmms-eval's evaluator on CPU torch; timm only pulls it back in)"
  "${pip[@]}" -c "$constraints" -e "$plain"
  "${pip[@]}" -c "$constraints" --no-deps "lmms-eval>=0.7.3,<0.8"
  "$py" scripts/lmms_eval_requirements.py > "$constraints.req"
  # pip's resolver reports the two packages left out on purpose as a conflict: drop just that report
  "${pip[@]}" -c "$constraints" -r "$constraints.req" 2> >(grep -v -E \
    "^ERROR: pip's dependency resolver does not currently|^lmms-eval [^ ]+ requires (timm|torchvision)" >&2)
  rm -f "$constraints.req"
fi
"$py" -c "from lmms_eval import evaluator" 2>/dev/null \
  || { echo "setup: lmms-eval does not import; see the error above" >&2; "$py" -c "from lmms_eval import evaluator"; }
echo "setup: done ($("${probe[@]}" 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
