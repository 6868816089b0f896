#!/usr/bin/env bash
# Train and evaluate an SPPnet detector on your own VOC-layout or
# XML-beside-images folder, with every step of the toolkit:
#   propose -> cache -> finetune -> train-svm -> detect -> eval -> draw
#
# usage: examples/train_voc.sh DATASET [WORK]
#   DATASET  VOC folder (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt)
#            or images/ + annotations/ + <split>.txt (the raccoon layout)
#   WORK     where the outputs go (default: runs/<dataset name>)
# environment: TRAIN_SPLIT (train), TEST_SPLIT (test), SCALES (688; 5-scale:
#   480,576,688,864,1200), SPP (the spp command; default: spp on PATH)
#
# Every step resumes: run it again after an interruption.
# With ../shared/data/raccoon these are the settings of the shipped detector
# (weights/README.md).
set -euo pipefail

data=${1:?usage: examples/train_voc.sh DATASET [WORK]}
work=${2:-runs/$(basename "$data")}
train=${TRAIN_SPLIT:-train}
test=${TEST_SPLIT:-test}
scales=${SCALES:-688}
spp=${SPP:-spp}
mkdir -p "$work"

# 1. Selective-search proposals for every image (train and test), all cores.
$spp propose --data "$data" --out "$work/props.json"
# 2. One conv pass per image per scale into the feature cache.
$spp cache --data "$data" --props "$work/props.json" --cache "$work/feats" --scales "$scales"
# 3. Fine-tune fc6/fc7 on SPP vectors of the training split (conv frozen).
$spp finetune --cache "$work/feats" --data "$data" --split "$train" --out "$work/head.safetensors"
# 4. Per-class SVMs on fine-tuned fc7 features, box regression on pool5.
$spp train-svm --cache "$work/feats" --data "$data" --split "$train" \
    --features fc7 --head "$work/head.safetensors" --out "$work/model.safetensors"
# 5. Detect on the test split (conv maps reused from the cache).
$spp detect --data "$data" --split "$test" --cache "$work/feats" \
    --model "$work/model.safetensors" --out "$work/dets.json"
# 6. VOC07 AP per class and mAP.
$spp eval "$work/dets.json" --data "$data" --split "$test" --out "$work/metrics.json"
# 7. Annotated test images (detections scoring >= 0).
$spp draw "$work/dets.json" --out "$work/drawn" --conf 0

python3 - "$work/metrics.json" <<'PY'
import json, sys
print(f"mAP {json.load(open(sys.argv[1]))['mAP']:.4f} ({sys.argv[1]})")
PY
