#!/usr/bin/env bash
# Train and evaluate an SPPnet detector on your own VOC-layout or
# XML-beside-images folder, with every step of the toolkit:
#   propose -> cache -> train-svm (pool5) / finetune + train-svm (fc7) -> detect -> eval -> draw
#
# usage: examples/train_voc.sh DATASET [WORK]
#   DATASET  VOC folder (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt)
#            or images/ + annotations/ + <split>.txt (the raccoon layout)
#   WORK     where the outputs go (default: runs/<dataset name>)
# environment: TRAIN_SPLIT (train), TEST_SPLIT (test), SCALES (688; 5-scale:
#   480,576,688,864,1200), FINETUNE (1; 0 skips the fine-tuned fc7 variant,
#   about half the run), SPP (the spp command; default: spp on PATH)
#
# Every step resumes: run it again after an interruption.
# With ../shared/data/raccoon: held-out mAP in README.md's table of figures
# (the shipped detector comes from `spp train`: weights/README.md).
set -euo pipefail

data=${1:?usage: examples/train_voc.sh DATASET [WORK]}
work=${2:-runs/$(basename "$data")}
train=${TRAIN_SPLIT:-train}
test=${TEST_SPLIT:-test}
scales=${SCALES:-688}
kinds="pool5"
[[ ${FINETUNE:-1} == 0 ]] || kinds="pool5 fc7"
spp=${SPP:-spp}
mkdir -p "$work"

# 1. Selective-search proposals for every image (train and test), all cores.
$spp propose --data "$data" --out "$work/props.json"
# 2. One conv pass per image per scale into the feature cache.
$spp cache --data "$data" --props "$work/props.json" --cache "$work/feats" --scales "$scales"
# 3. Per-class SVMs on the SPP vectors (pool5) of the training split, box
#    regression.
$spp train-svm --cache "$work/feats" --data "$data" --split "$train" --out "$work/model-pool5.safetensors"
# 4. Fine-tune fc6/fc7 on the same SPP vectors (conv frozen), then SVMs on fc7.
if [[ $kinds == *fc7* ]]; then
    $spp finetune --cache "$work/feats" --data "$data" --split "$train" --out "$work/head.safetensors"
    $spp train-svm --cache "$work/feats" --data "$data" --split "$train" \
        --features fc7 --head "$work/head.safetensors" --out "$work/model-fc7.safetensors"
fi
# 5. Detect on the test split (conv maps reused from the cache; box regression
#    and box voting, the defaults) and 6. score each model (VOC07 AP per class and mAP).
for kind in $kinds; do
    $spp detect --data "$data" --split "$test" --cache "$work/feats" \
        --model "$work/model-$kind.safetensors" --out "$work/dets-$kind.json"
    $spp eval "$work/dets-$kind.json" --data "$data" --split "$test" --out "$work/metrics-$kind.json"
done
# 7. Annotated test images from the pool5 model (detections scoring >= 0).
$spp draw "$work/dets-pool5.json" --out "$work/drawn" --conf 0

python3 - "$work" $kinds <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
names = {"pool5": "pool5+bbox+vote", "fc7": "ftfc7+bbox+vote"}
maps = ", ".join(f"{names[kind]} {json.loads((work / f'metrics-{kind}.json').read_text())['mAP']:.4f}" for kind in sys.argv[2:])
print(f"mAP {maps} (VOC07, {work})")
PY
