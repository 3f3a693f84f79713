#!/usr/bin/env bash
# Train both checkpoints on one GPU inside ~12 minutes and leave them, exported, in $OUT/weights.tar.
#
# Made for the project's lent GPU machine (its python3 holds a CUDA PyTorch): carry the data in
# .gpu-data/ (`make gpu-data` copies it there: Fashion-MNIST and MNIST, images and labels), then run
#     OUT=/some/folder bash deploy/gpu-train.sh
# Both runs share the GPU, train class-conditional models (labels from the IDX label files) at a
# constant learning rate with a weight EMA, and are stopped by SIGTERM after $MINUTES (the trainer
# saves its state on the signal); each is then exported with its test bits/dim, calibration and card.
# Settings can be overridden from the environment; DEVICE=cpu MINUTES=0.2 ARCH='--steps 1 --hidden 8'
# is a smoke test that runs anywhere.
set -euo pipefail

OUT=${OUT:?set OUT to the folder to write weights.tar into}
DATA=${DATA:-.gpu-data}
MINUTES=${MINUTES:-9}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
ARCH=${ARCH:---steps 32 --hidden 192}
OPTIM=${OPTIM:---batch-size 256 --lr 1e-3 --warmup-steps 500 --max-steps 1000000 --eval-minutes 4 --checkpoint-minutes 2}
RUNS=${RUNS:-/tmp/gpu-runs}
FASHION_LABELS=(T-shirt/top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag "Ankle boot")

export PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'device', '$DEVICE',
torch.cuda.get_device_name() if '$DEVICE'.startswith('cuda') else 'cpu')"

train() {  # name, images, extra flags...
    local name=$1 images=$2
    shift 2
    # shellcheck disable=SC2086  # ARCH and OPTIM are lists of flags
    timeout -s TERM "$(awk "BEGIN {print int($MINUTES * 60)}")" "$PYTHON" -m model.train --train "$images" \
        --dataset-name "$name" --output "$RUNS/$name" --device "$DEVICE" --conditional --quiet $ARCH $OPTIM "$@" \
        >"$RUNS/$name.log" 2>&1 || [ $? = 124 ]  # 124: stopped by the timeout's SIGTERM, state saved
}

started=$SECONDS
train fashion-mnist "$DATA/fashion-mnist/train-images-idx3-ubyte.gz" --label-names "${FASHION_LABELS[@]}" &
fashion=$!
train mnist "$DATA/mnist/train-images-idx3-ubyte.recon.gz" --train-labels "$DATA/mnist/train-labels-idx1-ubyte.gz" &
mnist=$!
wait $fashion && wait $mnist
echo "trained for $((SECONDS - started)) s"
for name in fashion-mnist mnist; do tail -n 3 "$RUNS/$name.log"; done

export_run() {  # name, test images
    "$PYTHON" -m model.export --run "$RUNS/$1" --test "$2" --output "$RUNS/weights/$1" --device "$DEVICE"
}
export_run fashion-mnist "$DATA/fashion-mnist/t10k-images-idx3-ubyte.gz"
export_run mnist "$DATA/mnist/t10k-images-idx3-ubyte.gz"
for name in fashion-mnist mnist; do cp "$RUNS/$name/log.jsonl" "$RUNS/weights/$name/log.jsonl"; done
tar -C "$RUNS/weights" -cf "$OUT/weights.tar" .
echo "wrote $OUT/weights.tar in $((SECONDS - started)) s"
