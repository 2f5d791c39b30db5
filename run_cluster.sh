#!/usr/bin/env bash
# The paper's end-to-end experiment (Fig. 6): first the cost-model check (bench.py a2a), then
# MoE-GPT presets, static EP then NetMoE in one job, 20 start-up + 50 measured iterations
# (SKIP_STEPS=20, STEPS=70), one JSON per preset, then one summary table.
#
# The paper's cluster, 4 nodes x 8 GPUs (hosts node0 .. node3, this folder at the same path on
# each): run it on every node at about the same time, NODE_RANK = 0, 1, 2, 3, node 0 the master:
#   for i in 0 1 2 3; do ssh node$i "cd $PWD && NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 NPROC_PER_NODE=8 \
#       ./run_cluster.sh s m l xl" & done; wait
# One host (all its GPUs, one node; only the device stage of the solver has work):
#   ./run_cluster.sh s m
# One 4-GPU host pretending to be 2 nodes of 2 (both solver stages, NVLink on both tiers):
#   NPROC_PER_NODE=4 TOPOLOGY=2x2 ./run_cluster.sh s
# Anything after the presets' `--` goes to train_gpt.py, e.g. `./run_cluster.sh s -- --batch 8` or
# `./run_cluster.sh s -- --exchange node --relayout-every 20`.
# Before each torchrun the master is checked: MASTER_ADDR must resolve, be this host on node 0,
# and answer on MASTER_PORT within WAIT seconds (60) on the other nodes; each job's rendezvous
# waits as long for the other nodes. Else one line says which host failed. Ctrl-C stops at once.
# NCCL settings are read from the environment as usual (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...).
set -euo pipefail
cd "$(dirname "$0")"

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
WAIT=${WAIT:-60}
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

# torchrun itself would retry an unreachable master for minutes, printing C++ stack frames, and
# take Ctrl-C only when it is done: the master is checked first, here, where Ctrl-C works.
check_master() {
    python - "$MASTER_ADDR" "$MASTER_PORT" "$NODE_RANK" "$WAIT" <<'EOF'
import socket, sys, time
host, port, node, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def fail(why):
    sys.exit(f"run_cluster.sh: {why}")
try:
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        fail(f"MASTER_ADDR={host} does not resolve on {socket.gethostname()} ({e.strerror}): "
             f"give node 0's hostname or IP address")
    if node == 0:   # node 0 holds the rendezvous: MASTER_ADDR must name this host
        def local(a):
            with socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET) as s:
                try:
                    s.bind((a, 0))
                    return True
                except OSError:
                    return False
        if not any(local(a) for a in addrs):
            fail(f"MASTER_ADDR={host} ({', '.join(sorted(addrs))}) is not this host ({socket.gethostname()}), "
                 f"but this is node 0 (NODE_RANK=0): run node 0 on {host}, or point MASTER_ADDR here")
    else:   # node 0's rendezvous must answer, within WAIT seconds
        start = time.monotonic()
        while True:
            try:
                socket.create_connection((host, port), timeout=2).close()
                break
            except OSError as e:
                if time.monotonic() - start > wait:
                    fail(f"node 0 at MASTER_ADDR={host} port {port} did not answer within {wait:g} s "
                         f"({e.strerror or e}): start run_cluster.sh there too (NODE_RANK=0), or check "
                         f"MASTER_ADDR, MASTER_PORT and the firewall")
                time.sleep(1)
except KeyboardInterrupt:
    sys.exit(130)
EOF
}

# torchrun runs in a process group of its own, waited on, so that Ctrl-C reaches this script at
# once: it passes it on to torchrun, which stops its ranks (training saves first); a torchrun
# still in its rendezvous has no ranks yet and cannot take a signal, so it is ended.
job=
stop() {
    trap - INT TERM
    if [ -n "$job" ] && kill -0 "$job" 2>/dev/null; then
        kill -INT "$job" 2>/dev/null || true
        sleep 1
        pgrep -P "$job" >/dev/null || kill -KILL "$job" 2>/dev/null || true
        wait "$job" 2>/dev/null || true
    fi
    echo "run_cluster.sh: interrupted" >&2
    exit 130
}
trap stop INT TERM
run() {   # script, then its arguments
    check_master
    set -m
    torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --rdzv-conf "timeout=$WAIT" "$@" &
    job=$!
    set +m
    local status=0
    wait "$job" || status=$?
    job=
    return "$status"
}

mkdir -p "$OUT"
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
