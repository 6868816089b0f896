#!/bin/bash
# The --gpu path end to end on a CUDA machine: the README's main command, then `spp train` on the
# first 80 images of bccd's trainval (learned proposals: --scales auto trains both maps and makes
# the objectness choice), `spp detect` and `spp eval` on the first 30 of its test split, all with
# --gpu. Not a test (CI has no GPU). From the repository root, with spp importable:
#
#     bash benchmarks/gpu_check.sh ../shared/data/bccd [WORK]
set -eo pipefail
data=${1:?usage: bash benchmarks/gpu_check.sh BCCD_DIR [WORK]}
work=${2:-$(mktemp -d)}
spp() { python3 -m spp_cli "$@"; }
mkdir -p "$work"
head -80 "$data/ImageSets/Main/trainval.txt" > "$work/trainval80.txt"
head -30 "$data/ImageSets/Main/test.txt" > "$work/test30.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
spp detect examples/raccoon.jpg --gpu --out "$work/raccoon.json" 2>&1 | tail -2
spp train --data "$data" --split "$work/trainval80.txt" --proposals learned --gpu --out "$work/b.safetensors" --work "$work/b.work" 2>&1 \
    | grep -E "^(Scale|validation mAP|Chose)"
spp detect --data "$data" --split "$work/test30.txt" --model "$work/b.safetensors" --gpu --out "$work/d.json" 2>&1 | tail -1
spp eval "$work/d.json" --data "$data" --split "$work/test30.txt" 2>&1 | grep mAP
