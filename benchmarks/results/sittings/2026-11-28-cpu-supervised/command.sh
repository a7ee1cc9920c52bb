#!/bin/bash
# supervised at cifar10_4k_short's scale on the CPU (bf16 autocast, channels_last as on the GPU)
cd /work/main && . .venv/bin/activate
exec nice -n 10 mpl-fast bench methods --methods supervised --set data.root=/work/shared/data/cifar10 \
  --set train.device=cpu --set train.amp=bf16 --set train.channels_last=true \
  --out runs/sup_cpu/runs --results runs/sup_cpu/results "$@"
