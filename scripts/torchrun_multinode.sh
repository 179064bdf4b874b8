#!/usr/bin/env bash
# Encode a dataset on several nodes with torchrun: run this once on every node.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/torchrun_multinode.sh --model-config ... 
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/torchrun_multinode.sh --model-config ...
#
# Every argument after the script name goes to `wds-encode run` (the same on every node; the output
# path must be a file system every node sees). torchrun starts one rank per GPU (NPROC_PER_NODE,
# default: every GPU of the node); node 0's torchrun hosts the store the ranks claim work from. Run
# the same commands again to resume: finished units are skipped.
set -euo pipefail

NNODES=${NNODES:?set NNODES to the number of nodes}
NODE_RANK=${NODE_RANK:?set NODE_RANK to this node\'s index, 0 to NNODES-1}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to node 0\'s address}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m wds_encode run --num-nodes "$NNODES" "$@"
