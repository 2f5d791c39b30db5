#!/usr/bin/env bash
# The paper's end-to-end experiment (Fig. 6): first the cost-model check (bench.py a2a), then
# MoE-GPT presets, static EP then NetMoE in one job, 20 start-up + 50 measured iterations
# (SKIP_STEPS=20, STEPS=70), one JSON per preset, then one summary table.
#
# The paper's cluster, 4 nodes x 8 GPUs -- run on every node, NODE_RANK = 0, 1, 2, 3:
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 ./run_cluster.sh s m l xl
# One host (all its GPUs, one node; only the device stage of the solver has work):
#   ./run_cluster.sh s m
# One 4-GPU host pretending to be 2 nodes of 2 (both solver stages, NVLink on both tiers):
#   NPROC_PER_NODE=4 TOPOLOGY=2x2 ./run_cluster.sh s
# Anything after the presets' `--` goes to train_gpt.py, e.g. `./run_cluster.sh s -- --batch 8` or
# `./run_cluster.sh s -- --exchange node --relayout-every 20`.
# NCCL settings are read from the environment as usual (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...).
set -euo pipefail
cd "$(dirname "$0")"

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
STEPS=${STEPS:-70}
SKIP_STEPS=${SKIP_STEPS:-20}
OUT=${OUT:-results}
TOPOLOGY=${TOPOLOGY:-${NNODES}x${NPROC_PER_NODE}}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

presets=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do presets+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#presets[@]} -gt 0 ] || presets=(s)

mkdir -p "$OUT"
run() {   # script, then its arguments
    torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
}
# First the cost-model check (CHECK_A2A=0 skips it): Eq. 1's alpha and bandwidth fitted per tier,
# then timed All-to-Alls of skewed and NetMoE traffic matrices against the fitted model.
if [ "${CHECK_A2A:-1}" = 1 ] && [ $((NNODES * NPROC_PER_NODE)) -gt 1 ]; then
    run bench.py a2a --topology "$TOPOLOGY" --json "$OUT/bench_a2a_${TOPOLOGY}.json"
fi
files=()
for p in "${presets[@]}"; do
    json="$OUT/cluster_${p}_${TOPOLOGY}.json"
    run train_gpt.py compare --preset "$p" --topology "$TOPOLOGY" --steps "$STEPS" --skip-steps "$SKIP_STEPS" \
        --log-every 10 --json "$json" "$@"
    files+=("$json")
done
if [ "$NODE_RANK" = 0 ]; then
    python bench.py summary "${files[@]}"
fi
