#!/usr/bin/env bash
# One device call for the speed issue (29): install the carried wheels, make the package importable, run every stage
# of benchmarks/speed_session.py within its budget, and print the session's table last. Results go to $OUT (the
# device tool's output folder; /tmp/speed_session elsewhere). Extra arguments go to speed_session.py, e.g.
#   bash benchmarks/gpu_speed_session.sh --budget 480
#   bash benchmarks/gpu_speed_session.sh --stages regional_dynamic regional_transformer   # the regional variants
#   bash benchmarks/gpu_speed_session.sh --quick --device cpu                             # smoke test on a CPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/speed_session}
mkdir -p "$OUT"
start=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then  # diffusers 0.42.1, torchao 0.18.0, importlib_metadata (carried: no registry)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# the repository root is the package negative_prompt_inversion
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/negative_prompt_inversion
export PYTHONPATH=/tmp/pkg:$PWD:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
  echo "setup took $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/environment.txt"
python3 -m benchmarks.speed_session --out "$OUT" "$@"
