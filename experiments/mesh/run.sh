#!/usr/bin/env bash
# The (dp x cp) mesh on CPU: 4 gloo ranks as (4x1), (2x2), (1x4), with and without sharded model
# state (FSDP2), one model size and N. One Hydra multirun (each 4-process job is its own launch).
# OUT=folder (default outputs/mesh); STEPS, SEQ_LEN, D_MODEL, N_LAYER to change the point.
set -euo pipefail
OUT=${OUT:-outputs/mesh}
STEPS=${STEPS:-12}
SEQ_LEN=${SEQ_LEN:-256}
D_MODEL=${D_MODEL:-512}
N_LAYER=${N_LAYER:-4}
python -m dilexp -m hardware=cp hardware.accelerator=cpu hardware.devices=4 hardware.precision=32-true \
  hardware.threads=1 hardware.cp_size=1,2,4 hardware.shard_model=false,true \
  attention=ring_v2 data.seq_len="$SEQ_LEN" model.d_model="$D_MODEL" model.n_head=8 model.n_layer="$N_LAYER" \
  task.batch_size=2 task.max_steps="$STEPS" task.warmup_steps=2 task.log_every_n_steps=4 \
  task.val_every_n_steps="$STEPS" task.val_batches=1 task.checkpoint=false logger=csv \
  hydra.sweep.dir="$OUT"
python "$(dirname "$0")/table.py" "$OUT"
