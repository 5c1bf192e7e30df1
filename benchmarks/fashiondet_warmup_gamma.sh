#!/bin/bash
# The FashionDet ladder's warm-up and gamma check: one seed on val of warm-up x12 (40 instead of
# 3 iterations at 1x) and gamma 0.3 (instead of 0.1), each beside the lr chosen by
# fashiondet_benchmark.py, for scratch (lr 0.04) and PreDet (lr 0.02), two runs side by side.
# Needs the ladder's PreDet checkpoint (runs/bench_ladder). Results: runs/bench_ladder/extra/.
cd "$(dirname "$0")/.."
BASE="schedule=1x train.eval_period=0 data.train=data/fashiondet/det/annotations/train.json data.train_images=data/fashiondet/det/images data.val=data/fashiondet/det/annotations/val.json data.val_images=data/fashiondet/det/images data.test=data/fashiondet/det/annotations/test.json data.test_images=data/fashiondet/det/images train.progress=false schedule_scale=0.000833333 model.box_batch_size_per_image=64 model.mask_head_dim=64"
P=runs/bench_ladder/pretrain/predet/checkpoints/model_final.pth
lane() { # init lr name
  for g in solver.warmup_iters=12000 solver.gamma=0.3; do
    OMP_NUM_THREADS=1 .venv/bin/predet sweep --config finetune/fashiondet_r18_cpu --out runs/bench_ladder/extra/$3_${g%%=*} --seeds 1 --threads 1 init=$1 solver.lr=$2 $BASE --grid $g
  done
}
lane $P 0.02 predet > runs/extra_predet.out 2>&1 &
lane scratch 0.04 scratch > runs/extra_scratch.out 2>&1 &
wait
