#!/bin/bash
cd /work/main
set -e
uptime
time .venv/bin/fastdiff train --preset digits-v --out runs/digits-v --no-progress | tail -1
time .venv/bin/fastdiff distill --teacher runs/digits-v --out runs/digits-v-r10 --regress-weight 10 --regress-at all --regress-pairs 1024 --no-progress | tail -1
time .venv/bin/python -m fastdiff.distill_table --teacher runs/digits-v --student runs/digits-v-r10 --n 1000 --no-progress --out runs/digits-v-r10/table.md
