#!/usr/bin/env bash
# The peer engines' own Python environments for benchmarks/peers.py (issue 34), made here and never by edgeq's
# install: each peer pins its own torch. Idempotent: an environment whose packages are in place is left alone.
#
#   .venv-executorch: ExecuTorch 1.5.1 (its wheel links libtorch but declares no torch: the CPU torch it was built
#                     against, 2.13.0+cpu, goes in first), torchao 0.18 (PT2E quantization);
#   .venv-litert:     LiteRT 2.3.0 (ai-edge-litert) and litert-torch 0.10, which writes its int8 file, on the same
#                     CPU torch.
#
# Both take torchvision without its dependencies (and pillow, which its modules import): the registry's torchvision
# for that torch is a CUDA build whose compiled ops cannot load on a CPU torch; the benchmark needs none of them,
# only the models' definitions, plain Python (runner.py's torchvision_models imports them past the failing part).
#
#   bash benchmarks/peers/setup.sh [executorch] [litert]      (both by default; PYTHON=python3.11 by default)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3.11}"
torch_cpu="torch==2.13.0+cpu"
torchvision="torchvision==0.28.0"

declare -A packages=(
  [executorch]="executorch==1.5.1 torchao==0.18.0"
  [litert]="ai-edge-litert==2.3.0 litert-torch==0.10.0 torchao==0.18.0"
)
declare -A probes=(
  [executorch]="import executorch.runtime, torchao; from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner"
  [litert]="import ai_edge_litert.interpreter, litert_torch"
)
models_probe="import sys; sys.path.insert(0, '$here'); from runner import torchvision_models; torchvision_models().resnet18()"

make_env() {
  local name="$1" venv="$here/.venv-$1"
  if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "${probes[$name]}; $models_probe" 2>/dev/null; then
    echo "$venv: ready"
    return
  fi
  echo "$venv: installing ${packages[$name]}"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # The CPU torch first and named again with the rest, so that no package's own torch requirement replaces it.
  "$venv/bin/python" -m pip install --quiet "$torch_cpu"
  "$venv/bin/python" -m pip install --quiet "$torch_cpu" ${packages[$name]}
  "$venv/bin/python" -m pip install --quiet --no-deps "$torchvision"
  "$venv/bin/python" -m pip install --quiet pillow
  "$venv/bin/python" -c "${probes[$name]}; $models_probe"
  echo "$venv: ready ($(du -sh "$venv" | cut -f1))"
}

envs=("$@")
[[ ${#envs[@]} -gt 0 ]] || envs=(executorch litert)
for name in "${envs[@]}"; do
  [[ -n "${packages[$name]:-}" ]] || { echo "unknown environment '$name' (choose from: ${!packages[*]})" >&2; exit 2; }
  make_env "$name"
done
