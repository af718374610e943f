#!/usr/bin/env bash
# Two "nodes" on one machine, for multi-node tests without a second machine or ssh (root and iproute2).
#
#   launchers/netns-nodes.sh up NAME            # nodes NAME-0 and NAME-1
#   launchers/netns-nodes.sh exec NAME I CMD... # run CMD in node I (exec: it keeps this process's pid)
#   launchers/netns-nodes.sh addr NAME I        # node I's address (10.231.0.1, 10.231.0.2)
#   launchers/netns-nodes.sh cut NAME I         # take node I's link down: its peers hear nothing more,
#   launchers/netns-nodes.sh join NAME I        #   not even a closed connection (a lost node); and back up
#   launchers/netns-nodes.sh kill NAME I        # SIGKILL every process in node I, wait until they are gone
#   launchers/netns-nodes.sh down NAME          # kill everything in both nodes, remove what `up` made
#
# Node I is a network namespace NAME-I with loopback and one end of a veth pair, interface `lveth`
# (the same name in both nodes: GLOO_SOCKET_IFNAME=lveth, NCCL_SOCKET_IFNAME=lveth) at
# $LONGVL_NODES_SUBNET.(I+1)/24 (default subnet 10.231.0). The two addresses are all there is: no
# route leaves the pair, so a node reaches only itself and the other node. /etc/hosts inside the nodes
# (through /etc/netns/NAME-I/hosts, which `ip netns exec` mounts over /etc/hosts) names them NAME-0 and
# NAME-1. `exec` also gives the command a mount namespace of its own with an empty /dev/shm (tmpfs) and
# the host name NAME-I, so a node-local shortcut taken across nodes (POSIX shared memory, a file in
# /dev/shm) fails as it would on two machines. Everything else, the repository and run folders
# included, is the host's file system, shared by both nodes like a cluster's shared storage.
#
# `down` is safe to call on a half-made or already removed pair, and exits 0 when nothing is left;
# `up` refuses a NAME that exists. Every wait is bounded (LONGVL_NODES_WAIT_S, default 30 s).
set -eEuo pipefail

subnet=${LONGVL_NODES_SUBNET:-10.231.0}
wait_s=${LONGVL_NODES_WAIT_S:-30}
IFACE=lveth

die() { echo "netns-nodes.sh: $*" >&2; exit 1; }
need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network and mount namespaces)"
  command -v ip >/dev/null && command -v unshare >/dev/null || die "needs ip (iproute2) and unshare (util-linux)"
}
node_index() { [[ $1 == 0 || $1 == 1 ]] || die "node index must be 0 or 1, got '$1'"; }
ns() { echo "$1-$2"; }
exists() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }
addr() { echo "$subnet.$(($2 + 1))"; }

kill_node() {  # SIGKILL every process in node $2 (by network namespace) and wait until none is left
  local name=$1 i=$2 deadline=$((SECONDS + wait_s)) pids
  exists "$(ns "$name" "$i")" || return 0
  while pids=$(ip netns pids "$(ns "$name" "$i")") && [ -n "$pids" ]; do
    # shellcheck disable=SC2086  # one pid per word
    kill -9 $pids 2>/dev/null || true
    [ $SECONDS -lt $deadline ] || die "processes $pids in node $(ns "$name" "$i") outlived SIGKILL by ${wait_s}s"
    sleep 0.1
  done
}

up() {
  local name=$1 i
  for i in 0 1; do ! exists "$(ns "$name" $i)" || die "node $(ns "$name" $i) exists (down $name first)"; done
  trap 'rc=$?; trap - ERR; down "$name" >/dev/null 2>&1; exit $rc' ERR  # a half-made pair is removed
  for i in 0 1; do
    ip netns add "$(ns "$name" $i)"
    mkdir -p "/etc/netns/$(ns "$name" $i)"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$(addr "$name" 0)" "$(ns "$name" 0)" \
      "$(addr "$name" 1)" "$(ns "$name" 1)" >"/etc/netns/$(ns "$name" $i)/hosts"
  done
  ip link add "$IFACE" netns "$(ns "$name" 0)" type veth peer name "$IFACE" netns "$(ns "$name" 1)"
  for i in 0 1; do
    ip -n "$(ns "$name" $i)" addr add "$(addr "$name" $i)/24" dev "$IFACE"
    ip -n "$(ns "$name" $i)" link set lo up
    ip -n "$(ns "$name" $i)" link set "$IFACE" up
  done
  trap - ERR
  for i in 0 1; do echo "node $i: netns $(ns "$name" $i), interface $IFACE, address $(addr "$name" $i)"; done
}

down() {
  local name=$1 i
  for i in 0 1; do
    kill_node "$name" $i
    if exists "$(ns "$name" $i)"; then ip netns del "$(ns "$name" $i)"; fi  # the veth goes with it
    rm -rf "/etc/netns/$(ns "$name" $i)"
  done
  rmdir --ignore-fail-on-non-empty /etc/netns 2>/dev/null || true
  for i in 0 1; do
    ! exists "$(ns "$name" $i)" || die "node $(ns "$name" $i) is still there"
  done
}

cmd=${1:-}
[ $# -ge 2 ] || die "usage: $0 up|down NAME | exec NAME I CMD... | addr|cut|join|kill NAME I"
name=$2
[[ $name =~ ^[A-Za-z0-9_.-]{1,40}$ ]] || die "bad NAME '$name'"
case $cmd in
  up) need_root; up "$name" ;;
  down) need_root; down "$name" ;;
  addr) node_index "${3:-}"; addr "$name" "$3" ;;
  cut | join)
    need_root; node_index "${3:-}"
    ip -n "$(ns "$name" "$3")" link set "$IFACE" "$([ "$cmd" = cut ] && echo down || echo up)" ;;
  kill) need_root; node_index "${3:-}"; kill_node "$name" "$3" ;;
  exec)
    need_root; node_index "${3:-}"
    [ $# -ge 4 ] || die "usage: $0 exec NAME I CMD..."
    node=$(ns "$name" "$3")
    shift 3
    # ip netns exec and unshare exec in turn (no fork), so CMD keeps this process's pid and group
    exec ip netns exec "$node" unshare --mount --uts --propagation private \
      sh -c 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && hostname "$0" && exec "$@"' "$node" "$@" ;;
  *) die "unknown command '$cmd' (up, down, exec, addr, cut, join, kill)" ;;
esac
