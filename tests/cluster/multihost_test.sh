#!/usr/bin/env bash
# The demo config trained across 2 hosts x 2 ranks (network namespaces, TCP
# between hosts, shared memory inside one): tensor parallel 2 inside each host,
# expert parallel 2 across the hosts. Its losses equal those of the same layout
# on one host (1e-5), and moe-launch prints the mpirun command it ran.
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"
cluster_init "$1" "$2"
cluster_corpus || exit 1
cluster_up 2 2 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path="$CLUSTER_CORPUS" parallel.tensor=2
        parallel.expert=2 model.num_layers=2 model.seq_len=32 train.steps=4 train.log_every=1 train.eval_every=0
        train.eval_batches=1 optim.warmup_steps=1 checkpoint.dir=)

# Where the ranks run: 2 on each host, by the host's own name.
cluster_launch -n 4 --program hostname > where.out 2>&1 || { echo "FAIL: hostname on 4 ranks"; cat where.out; fail=1; }
for k in 1 2; do
  [ "$(grep -cx "$(cluster_ns $k)" where.out)" = 2 ] || { echo "FAIL: not 2 ranks on host $k"; cat where.out; fail=1; }
done
cluster_launch -n 4 -- "${common[@]}" train.run_dir=multi > multi.out 2>&1 ||
  { echo "FAIL: the 2-host run"; cat multi.out; fail=1; }
# The command it ran: 4 ranks over the hostfile, reached through the agent, TCP on the cluster's subnet.
for want in "mpirun -np 4 --hostfile $CLUSTER_HOSTFILE" "plm_rsh_agent $CLUSTER_AGENT" \
            "btl tcp,self,vader" "btl_tcp_if_include $CLUSTER_CIDR" "oob_tcp_if_include $CLUSTER_CIDR"; do
  grep -qF -- "moe-launch: " multi.out && grep -F -- "moe-launch: " multi.out | grep -qF -- "$want" ||
    { echo "FAIL: the printed command lacks '$want'"; grep "moe-launch:" multi.out; fail=1; }
done
grep -q "TP groups   {0,1} {2,3}" multi.out || { echo "FAIL: layout table"; cat multi.out; fail=1; }
"$BIN/moe-launch" -n 4 -- "${common[@]}" train.run_dir=single > single.out 2>&1 ||
  { echo "FAIL: the one-host run"; cat single.out; fail=1; }
cluster_compare_losses multi/metrics.jsonl single/metrics.jsonl 1e-5 || fail=1
test_done "cluster multihost test"
