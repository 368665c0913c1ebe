#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run: the `gpu`-marked tests, then the
# pretraining throughput benchmark (resnet18_cifar width 1.0, batch 512; old default,
# old kornia views, new default, +compile, +cuda-graphs side by side), then a profile of
# the new default and +cuda-graphs (top GPU ops, how busy the GPU was).
#
#   benchmarks/gpu_checks.sh OUTDIR
#
# Run from the repository root with edge-ssl installed (`pip install -e '.[dev]'`: the
# benchmark's baseline rows need kornia). Writes OUTDIR/gpu_tests.log,
# OUTDIR/pretrain_throughput.{json,log} and OUTDIR/pretrain_profile.{json,log}; exits
# non-zero when any step failed. Name the GPU beside every number you quote from it. PYTHON picks the
# interpreter (default: python3).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" - <<'EOF' || exit 2
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_checks: torch.cuda.is_available() is False here; nothing to check.")
print(f"gpu_checks: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
"$py" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
"$py" benchmarks/pretrain_throughput.py --batch-size 512 --width 1.0 --device cuda \
    --json-out "$out/pretrain_throughput.json" 2>&1 | tee "$out/pretrain_throughput.log"
bench=${PIPESTATUS[0]}
# Where the step time goes (a separate, short run: the JSON above is already written).
"$py" benchmarks/pretrain_throughput.py --batch-size 512 --width 1.0 --device cuda --steps 20 \
    --settings new-default --profile new-default,+cuda-graphs \
    --json-out "$out/pretrain_profile.json" 2>&1 | tee "$out/pretrain_profile.log"
profile=${PIPESTATUS[0]}
echo "gpu_checks: gpu tests exit $tests, throughput benchmark exit $bench, profile exit $profile"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$profile" -eq 0 ]
