#!/usr/bin/env bash
# A cluster of "hosts" on one machine, for the cluster tests: each host is a
# Linux network namespace with one interface (moe0) on a private subnet, joined
# through veth pairs to a bridge that lives in a namespace of its own. The
# addresses exist only inside those namespaces; nothing touches the machine's
# own network. Open MPI reaches a host through an rsh agent script that enters
# its namespace (`ip netns exec`, with a hostname of its own in a UTS
# namespace), the way ssh reaches a real node, and talks
# TCP between hosts (shared memory inside one host).
#
#   source tests/cluster/cluster_lib.sh
#   cluster_init "$BIN" "$SRC"         # test_init (tests/lib/test_env.sh), skip (77) without namespaces
#   cluster_up 3 2                     # 3 hosts, 2 slots each -> $CLUSTER_HOSTFILE
#   cluster_launch -n 6 -- ARGS...     # moe-launch from host 1, ranks on all hosts
#   cluster_link_down 2                # cut host 2's link (ip link set down inside it)
#   cluster_delete_host 3              # kill host 3's processes and remove it
#   (teardown of every namespace and process runs on exit, also on failure)
#
# Requires root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"

CLUSTER_SUBNET="10.213.0"               # host k (1-based) is $CLUSTER_SUBNET.(k+1)
CLUSTER_CIDR="$CLUSTER_SUBNET.0/24"
CLUSTER_TAG="moec$$"                     # namespace name prefix, unique per test process
CLUSTER_NAMESPACES=()
CLUSTER_SKIP_CODE=77                     # ctest SKIP_RETURN_CODE

cluster_init() {
  test_init "$1" "$2"
  CLUSTER_DIR="$TMP"
  test_at_exit cluster_teardown
  local probe="${CLUSTER_TAG}-probe" why
  if ! why=$(ip netns add "$probe" 2>&1); then
    echo "SKIP: network namespaces are refused here (ip netns add: ${why:-no iproute2}); the cluster tests need root and CAP_SYS_ADMIN"
    exit $CLUSTER_SKIP_CODE
  fi
  ip netns del "$probe"
}

cluster_ns() { echo "${CLUSTER_TAG}-h$1"; }
cluster_ip() { echo "$CLUSTER_SUBNET.$(( $1 + 1 ))"; }

# cluster_up HOSTS SLOTS: builds the hosts, the hostfile ($CLUSTER_HOSTFILE)
# and the rsh agent ($CLUSTER_AGENT).
cluster_up() {
  local hosts="$1" slots="$2" k ns bridge="${CLUSTER_TAG}-br"
  ip netns add "$bridge" || return 1
  CLUSTER_NAMESPACES+=("$bridge")
  ip -n "$bridge" link add br0 type bridge && ip -n "$bridge" link set br0 up || return 1
  : > "$CLUSTER_DIR/hostfile"
  : > "$CLUSTER_DIR/hosts.map"
  for k in $(seq 1 "$hosts"); do
    ns=$(cluster_ns "$k")
    ip netns add "$ns" || return 1
    CLUSTER_NAMESPACES+=("$ns")
    ip -n "$bridge" link add "h$k" type veth peer name moe0 netns "$ns" || return 1
    ip -n "$bridge" link set "h$k" master br0 up || return 1
    ip -n "$ns" addr add "$(cluster_ip "$k")/24" dev moe0 || return 1
    ip -n "$ns" link set lo up && ip -n "$ns" link set moe0 up || return 1
    echo "$(cluster_ip "$k") slots=$slots" >> "$CLUSTER_DIR/hostfile"
    echo "$(cluster_ip "$k") $ns" >> "$CLUSTER_DIR/hosts.map"
  done
  CLUSTER_HOSTFILE="$CLUSTER_DIR/hostfile"
  CLUSTER_AGENT="$CLUSTER_DIR/netns-rsh"
  # Each host runs a stand-in for sshd: a listener on port 22 of its own
  # address. The agent connects to it from the caller's namespace before it
  # enters the host, so, like ssh, it fails when the host is down or cut off.
  for k in $(seq 1 "$hosts"); do
    ip netns exec "$(cluster_ns "$k")" /usr/bin/python3 -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('$(cluster_ip "$k")', 22)); s.listen(64)
while True: s.accept()[0].close()" >/dev/null 2>&1 &
    disown
  done
  # The rsh agent: `netns-rsh [options] HOST COMMAND...` runs COMMAND with a
  # shell inside HOST's namespace, as `ssh HOST COMMAND...` would on the node.
  cat > "$CLUSTER_AGENT" <<EOF
#!/bin/bash
while [ \$# -gt 0 ]; do case "\$1" in -*) shift ;; *) break ;; esac; done
host="\$1"; shift
ns=\$(awk -v h="\$host" '\$1 == h { print \$2 }' "$CLUSTER_DIR/hosts.map")
if [ -z "\$ns" ] || ! timeout 2 bash -c "exec 3<>/dev/tcp/\$host/22" 2>/dev/null; then
  echo "netns-rsh: \$host: connect to port 22: host unreachable" >&2
  exit 255
fi
# Its own hostname (UTS namespace) as a node has: Open MPI names its shared
# memory segments and session directories after it.
exec ip netns exec "\$ns" unshare --uts /bin/sh -c 'hostname "\$0" && exec /bin/sh -c "\$1"' "\$ns" "\$*"
EOF
  chmod +x "$CLUSTER_AGENT"
  # Every host answers the agent from host 1 before anything starts.
  local ok i
  for k in $(seq 1 "$hosts"); do
    ok=0
    for i in $(seq 1 50); do
      ip netns exec "$(cluster_ns 1)" "$CLUSTER_AGENT" "$(cluster_ip "$k")" true 2>/dev/null && { ok=1; break; }
      sleep 0.1
    done
    [ $ok = 1 ] || { echo "FAIL: host 1 cannot reach host $k ($(cluster_ip "$k")) through the agent"; return 1; }
  done
}

# moe-launch run from host 1 (as a user runs it on a login or head node); the
# hostfile, agent and subnet of the cluster are passed, the rest is the caller's.
cluster_launch() {
  local ns
  ns=$(cluster_ns 1)
  ip netns exec "$ns" unshare --uts /bin/sh -c 'hostname "$0" && exec "$@"' "$ns" \
    "$BIN/moe-launch" --hostfile "$CLUSTER_HOSTFILE" --rsh-agent "$CLUSTER_AGENT" --net "$CLUSTER_CIDR" "$@"
}

# PIDs of moe-train ranks running on host K.
cluster_rank_pids() {
  local p
  for p in $(ip netns pids "$(cluster_ns "$1")" 2>/dev/null); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "moe-train" ] && echo "$p"
  done
}

cluster_link_down() { ip -n "$(cluster_ns "$1")" link set moe0 down; }

# Removes host K as a dead node vanishes: its processes are killed (-9) and its
# namespace deleted, so the health probe (the rsh agent) fails for it.
cluster_delete_host() {
  local ns p
  ns=$(cluster_ns "$1")
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  ip netns del "$ns" 2>/dev/null
}

# Waits up to $2 s for the extended regex $1 in file $3; 0 when seen.
cluster_wait_for() {
  local pattern="$1" limit="$2" file="$3" i
  for i in $(seq 1 $(( limit * 5 ))); do
    grep -Eq "$pattern" "$file" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# Losses of metrics.jsonl files equal within a relative tolerance, NaN/Inf
# failing; steps compared are those in the first file from $4 on (default all).
cluster_compare_losses() {
  python3 - "$@" <<'EOF'
import json, math, sys
a_path, b_path, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
first = int(sys.argv[4]) if len(sys.argv) > 4 else 1
def losses(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("event") == "train":
            out[int(r["step"])] = float(r["loss"])
    return out
a, b = losses(a_path), losses(b_path)
steps = sorted(s for s in a if s >= first)
if not steps:
    sys.exit(f"no train steps >= {first} in {a_path}")
worst = 0.0
for s in steps:
    if s not in b:
        sys.exit(f"step {s} is in {a_path} but not in {b_path}")
    x, y = a[s], b[s]
    if not (math.isfinite(x) and math.isfinite(y)):
        sys.exit(f"step {s}: loss not finite ({x} vs {y})")
    rel = abs(x - y) / max(abs(y), 1e-12)
    worst = max(worst, rel)
    if rel > tol:
        sys.exit(f"step {s}: loss {x!r} vs {y!r}, relative difference {rel:.3g} > {tol}")
print(f"losses of steps {steps[0]}..{steps[-1]} agree (worst relative difference {worst:.3g})")
EOF
}

# A small corpus for the runs, preprocessed once per test.
cluster_corpus() { test_corpus 80 && CLUSTER_CORPUS="$CORPUS"; }

# Every process of every host killed, every namespace deleted (at exit, also
# on failure; test_env.sh removes the directory after it).
cluster_teardown() {
  local ns p
  for ns in "${CLUSTER_NAMESPACES[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  done
  for ns in "${CLUSTER_NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
}
