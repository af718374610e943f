#!/usr/bin/env bash
# A private SLURM cluster on this machine, for the tests and for trying the sbatch scripts:
#
#   launchers/slurm/local-cluster.sh up       start it (installs the Debian packages when missing); idempotent
#   launchers/slurm/local-cluster.sh status   exit 0 when every daemon is up and every node takes jobs
#   launchers/slurm/local-cluster.sh down     stop the daemons this script started (by their recorded pids)
#
# then point the SLURM commands at it:  export SLURM_CONF=$LONGVL_SLURM_DIR/slurm.conf  (`up` prints it)
#
# Everything lives in one state folder, never in a system-wide file (/etc/slurm, /etc/munge are not
# read or written): its own slurm.conf, munge key and munge socket (AuthInfo=socket=...), pid files,
# logs and spool folders. The daemons run with the state folder as their working directory, so the
# checkout this script came from may be deleted while they run.
#
# Nodes: each node is a slurmd of its own on this host (`slurmd -N NAME`; Debian builds SLURM for that:
# `scontrol show config` says MULTIPLE_SLURMD = Yes), with its own port on its node line (Port=) and %n in
# its pid, log and spool paths. Two by default, so that single-node jobs (--nodes=1) and two-node jobs
# (--nodes=2) share one cluster and neither restarts the other's daemons. All nodes are this host
# (NodeAddr=127.0.0.1): the ranks of a two-node job get different SLURM_NODEID and SLURMD_NODENAME but the
# same host name, /tmp and /dev/shm; and a node name is no host name, so task.sh meets at the NodeAddr.
#
#   LONGVL_SLURM_DIR    state folder                      (default /tmp/longvl-slurm)
#   LONGVL_SLURM_NODES  node names, comma-separated       (default: HOST-1,HOST-2, HOST this host's short name)
#   LONGVL_SLURM_CPUS   CPUs each node advertises         (default: nproc, at least 2)
#   LONGVL_SLURM_PORT   slurmctld port; the nodes' slurmd use +1, +2, ...  (default 16817, away from SLURM's
#                       6817/6818)
#   LONGVL_SLURM_WAIT   seconds any single wait may take  (default 60)
#
# A controller (re)started by `up` begins with an empty queue. Two clusters at once need different
# LONGVL_SLURM_DIR, and LONGVL_SLURM_PORT values further apart than the number of nodes.
#
# Must run as root: slurmd launches the jobs' processes and munged runs as the munge user.
# Requires Debian/Ubuntu packages munge, slurmctld, slurmd, slurm-client (installed with apt-get when missing).
set -euo pipefail

STATE=${LONGVL_SLURM_DIR:-/tmp/longvl-slurm}
HOST=$(hostname -s)
NODES=${LONGVL_SLURM_NODES:-$HOST-1,$HOST-2}
PORT=${LONGVL_SLURM_PORT:-16817}
WAIT=${LONGVL_SLURM_WAIT:-60}
CONF=$STATE/slurm.conf
RUN=$STATE/run          # pid files: <daemon>.pid written by this script (the pid it started)
LOG=$STATE/log
MUNGE=$STATE/munge      # key, seed, munged's own pid file (only the munge user may enter)
SOCKET=$STATE/munge-socket/munge.socket  # its folder: owned by munge, entered by all (munged requires it)
PKGS=(munge slurmctld slurmd slurm-client)
ME=local-cluster.sh

die() { echo "$ME: ERROR: $*" >&2; exit 1; }
say() { echo "$ME: $*"; }

IFS=, read -ra NODE_LIST <<<"$NODES"
[ ${#NODE_LIST[@]} -ge 1 ] || die "LONGVL_SLURM_NODES is empty"
for n in "${NODE_LIST[@]}"; do [[ $n =~ ^[A-Za-z0-9_-]+$ ]] || die "bad node name '$n' in LONGVL_SLURM_NODES"; done
[[ $PORT =~ ^[0-9]+$ ]] && [[ $WAIT =~ ^[0-9]+$ ]] || die "LONGVL_SLURM_PORT and LONGVL_SLURM_WAIT must be integers"
LAST_PORT=$((PORT + ${#NODE_LIST[@]}))  # slurmctld, then one slurmd per node
((PORT >= 1024 && LAST_PORT <= 65535)) || die "LONGVL_SLURM_PORT=$PORT: ports $PORT..$LAST_PORT must be in 1024..65535"
[ -z "$(printf '%s\n' "${NODE_LIST[@]}" | sort | uniq -d)" ] || die "a node name appears twice in LONGVL_SLURM_NODES"

# ---------------------------------------------------------------------------------------- processes --
# pid_of NAME: the pid this script recorded for daemon NAME (empty when none)
pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }
# alive NAME COMM: the recorded pid is a live (not zombie) process whose command name is COMM;
# a pid that was reused by another program does not count
alive() {
  local pid st
  pid=$(pid_of "$1")
  [[ $pid =~ ^[0-9]+$ ]] && st=$(cat "/proc/$pid/stat" 2>/dev/null) && [[ $st == "$pid ($2) "[!ZX]* ]]
}
# wait_until SECONDS CMD...: run CMD every 0.2 s until it succeeds; false once SECONDS have passed
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}
# gone PID COMM: PID is no longer a live process called COMM
gone() { ! grep -qs "^$1 ($2) [^ZX]" "/proc/$1/stat"; }
# start NAME COMM CMD...: run CMD (which execs COMM) in a session of its own, in the state folder,
# record its pid; fail with the end of its log when it dies at once
start() {
  local name=$1 comm=$2
  shift 2
  (cd "$STATE" && exec setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&-) &  # not the lock (fd 9)
  echo $! >"$RUN/$name.pid"
  sleep 0.3
  alive "$name" "$comm" || die "$name exited at once; see $LOG/$name.out and $LOG/$name.log:
$(tail -n 15 "$LOG/$name.out" "$LOG/$name.log" 2>/dev/null)"
  say "started $name (pid $(pid_of "$name"))"
}
# stop NAME COMM: TERM the recorded pid, KILL after WAIT seconds; never anything this script did not start
stop() {
  local pid
  pid=$(pid_of "$1")
  if alive "$1" "$2"; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until "$WAIT" gone "$pid" "$2"; then
      say "$1 (pid $pid) ignored SIGTERM for ${WAIT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $1 (pid $pid)"
  elif [ -n "$pid" ]; then
    say "$1 (pid $pid) was not running"
  fi
  rm -f "$RUN/$1.pid"
}

export SLURM_CONF=$CONF
munge_ok() { munge --socket="$SOCKET" -n </dev/null | unmunge --socket="$SOCKET"; }
ctld_ok() { scontrol ping | grep -q 'is UP'; }
# node_state NODE: SLURM's state of the node, lower case (idle, mixed, down*, ...)
node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n 1; }
node_ok() { case $(node_state "$1") in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }
# recorded_slurmds: the slurmd-NAME pid files of this state folder, listed nodes or not (LONGVL_SLURM_NODES
# may have changed since they started)
recorded_slurmds() {
  local f
  for f in "$RUN"/slurmd-*.pid; do
    [[ -e $f && $f != *.daemon.pid ]] && basename "$f" .pid  # not slurmd's own pid file (SlurmdPidFile)
  done
  true
}
stop_slurmds() { local d; for d in $(recorded_slurmds); do stop "$d" slurmd; done; }
daemons_alive() {
  alive munged munged && alive slurmctld slurmctld || return 1
  local n
  for n in "${NODE_LIST[@]}"; do alive "slurmd-$n" slurmd || return 1; done
}
healthy() {
  daemons_alive && munge_ok >/dev/null 2>&1 && ctld_ok >/dev/null 2>&1 || return 1
  local n
  for n in "${NODE_LIST[@]}"; do node_ok "$n" || return 1; done
}

# ----------------------------------------------------------------------------------------- packages --
COMMANDS=(munged munge unmunge slurmctld slurmd scontrol sinfo srun sbatch setpriv flock)
missing_commands() { local c; for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null || printf '%s ' "$c"; done; }
have_commands() { [ -z "$(missing_commands)" ]; }
install_packages() {
  local missing=() p
  have_commands && return 0  # installed some other way: fine too
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  command -v apt-get >/dev/null || die "SLURM packages missing (${missing[*]}) and no apt-get to install them"
  say "installing ${missing[*]}"
  # a policy of our own (invoke-rc.d honours POLICYRCD) keeps the packages' scripts from starting the
  # system-wide daemons: this cluster runs its own
  printf '#!/bin/sh\nexit 101\n' >"$STATE/policy-rc.d"
  chmod 755 "$STATE/policy-rc.d"
  DEBIAN_FRONTEND=noninteractive POLICYRCD=$STATE/policy-rc.d apt-get update -qq ||
    die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive POLICYRCD=$STATE/policy-rc.d \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$LOG/apt-get.log" 2>&1 ||
    die "apt-get install ${missing[*]} failed:
$(tail -n 20 "$LOG/apt-get.log")"
}

# ------------------------------------------------------------------------------------------- config --
write_conf() {
  local cpus mem i new
  cpus=${LONGVL_SLURM_CPUS:-$(nproc)}
  ((cpus >= 2)) || cpus=2  # the tests run two ranks on one node
  # 80% of the machine's memory, shared out among the nodes: MemTotal does not change between runs, so
  # neither does the file
  mem=$(awk -v n=${#NODE_LIST[@]} '/^MemTotal:/ {print int($2 / 1024 * 0.8 / n)}' /proc/meminfo)
  new="# written by launchers/slurm/local-cluster.sh; rewritten by its 'up'
ClusterName=longvl-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
# no cgroups: plain /proc process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# sched_interval=1: a job whose begin time has passed (a requeued one) starts within a second, not 60
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
# trust the node lines below even where the detected hardware differs (no drained node)
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log"
  # one slurmd per node on this host, each on a port of its own
  for i in "${!NODE_LIST[@]}"; do
    new+="
NodeName=${NODE_LIST[i]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 1 + i))\
 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  done
  new+="
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  if [ "$(cat "$CONF" 2>/dev/null)" = "$new" ]; then
    return 1
  fi
  printf '%s\n' "$new" >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  say "wrote $CONF"
}

# --------------------------------------------------------------------------------------------- up --
up() {
  local t0=$SECONDS n changed=0
  local -a fresh=()  # the nodes whose slurmd this call started
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts the jobs, munged runs as the munge user)"
  install -d -m 755 "$STATE" "$RUN" "$LOG" "$STATE/spool"
  # one `up` or `down` at a time (two test sessions may start together)
  exec 9>"$STATE/lock"
  flock -w "$((WAIT * 10))" 9 || die "another $ME holds $STATE/lock for more than $((WAIT * 10))s"
  if [ -s "$CONF" ] && healthy; then
    say "already up ($CONF)"
    echo "SLURM_CONF=$CONF"
    return 0
  fi
  install_packages
  have_commands || die "$(missing_commands) not found after installing ${PKGS[*]}"

  # munge: its own key and socket, in a folder only the munge user may enter
  install -d -o munge -g munge -m 700 "$MUNGE"
  install -d -o munge -g munge -m 755 "$(dirname "$SOCKET")"
  if [ ! -s "$MUNGE/munge.key" ]; then
    dd if=/dev/urandom of="$MUNGE/munge.key.tmp" bs=1024 count=1 status=none
    chown munge:munge "$MUNGE/munge.key.tmp"
    chmod 400 "$MUNGE/munge.key.tmp"
    mv "$MUNGE/munge.key.tmp" "$MUNGE/munge.key"
    say "created $MUNGE/munge.key"
  fi
  if alive munged munged && munge_ok >/dev/null 2>&1; then
    say "munged already running (pid $(pid_of munged))"
  else
    stop munged munged
    rm -f "$SOCKET" "$SOCKET.lock"
    # setpriv execs munged as the munge user, so the recorded pid is munged's own
    start munged munged setpriv --reuid=munge --regid=munge --init-groups \
      munged --foreground --socket="$SOCKET" --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" \
      --seed-file="$MUNGE/munged.seed"   # in the foreground it logs to stderr: $LOG/munged.out
    wait_until "$WAIT" munge_ok || die "munge round trip through $SOCKET failed for ${WAIT}s; see $LOG/munged.out"
  fi

  # slurm.conf: a changed file needs fresh daemons (node definitions cannot be reconfigured)
  write_conf && changed=1
  install -d -m 755 "$STATE/spool/slurmctld"
  for n in "${NODE_LIST[@]}"; do install -d -m 755 "$STATE/spool/slurmd-$n"; done
  if [ $changed = 1 ]; then
    stop_slurmds
    stop slurmctld slurmctld
  fi
  if alive slurmctld slurmctld; then
    say "slurmctld already running (pid $(pid_of slurmctld))"
  else
    # -c: a controller that was not running starts with an empty queue, not with jobs of an earlier life
    start slurmctld slurmctld slurmctld -D -c -f "$CONF"
  fi
  wait_until "$WAIT" ctld_ok || die "slurmctld does not answer after ${WAIT}s; see $LOG/slurmctld.log:
$(tail -n 15 "$LOG/slurmctld.log" 2>/dev/null)"
  for n in "${NODE_LIST[@]}"; do
    if alive "slurmd-$n" slurmd; then
      say "slurmd-$n already running (pid $(pid_of "slurmd-$n"))"
    else
      start "slurmd-$n" slurmd slurmd -D -f "$CONF" -N "$n"
      fresh+=("$n")
    fi
  done

  # every node idle (or busy with jobs); a node left down or drained by an earlier run is resumed, and
  # one stuck 'completing' with jobs of a dead slurmd is cleared at once (slurmctld would take ~90 s)
  local deadline=$((SECONDS + WAIT)) state
  for n in "${NODE_LIST[@]}"; do
    while :; do
      state=$(node_state "$n")
      case $state in
        idle|mixed|allocated) break ;;
        completing) if [[ " ${fresh[*]} " == *" $n "* ]]; then
                      scontrol update nodename="$n" state=down reason="slurmd restarted" >/dev/null 2>&1 || true
                      scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
                    fi ;;
        down*|drain*|fail*) scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
      esac
      ((SECONDS < deadline)) || die "node $n is '$state', not idle, after ${WAIT}s; see $LOG/slurmd-$n.log
$(scontrol show node "$n" 2>&1 | grep -E 'State|Reason')"
      sleep 0.5
    done
  done
  if ((${#fresh[@]})); then  # slurmd just started: a job step on each of those nodes proves it launches tasks
    timeout "$WAIT" srun -J longvl-local-check -w "$(IFS=,; echo "${fresh[*]}")" -N${#fresh[@]} -n${#fresh[@]} \
      --chdir="$STATE" true >"$LOG/check.out" 2>&1 9>&- ||
      die "a one-task srun on each of ${fresh[*]} failed or took over ${WAIT}s:
$(tail -n 15 "$LOG/check.out")"
  fi
  say "up in $((SECONDS - t0))s: nodes ${NODE_LIST[*]}, logs in $LOG"
  echo "SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------------------------------- down --
down() {
  [ -d "$RUN" ] || { say "nothing to stop ($RUN does not exist)"; return 0; }
  exec 9>"$STATE/lock"
  flock -w "$((WAIT * 10))" 9 || die "another $ME holds $STATE/lock for more than $((WAIT * 10))s"
  stop_slurmds
  stop slurmctld slurmctld
  stop munged munged
}

status() {
  local rc=0 s
  for s in munged:munged slurmctld:slurmctld $(printf 'slurmd-%s:slurmd ' "${NODE_LIST[@]}"); do
    if alive "${s%%:*}" "${s##*:}"; then echo "${s%%:*}: running (pid $(pid_of "${s%%:*}"))"
    else echo "${s%%:*}: not running"; rc=1; fi
  done
  for s in $(recorded_slurmds); do  # started for a node that LONGVL_SLURM_NODES no longer lists
    [[ " ${NODE_LIST[*]} " == *" ${s#slurmd-} "* ]] || ! alive "$s" slurmd ||
      { echo "$s: running (pid $(pid_of "$s")) but not a node of $CONF; \`up\` or \`down\` stops it"; rc=1; }
  done
  if [ $rc = 0 ] && healthy; then
    echo "SLURM_CONF=$CONF"
    sinfo -N
  else
    rc=1
  fi
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status   (state in \$LONGVL_SLURM_DIR, default /tmp/longvl-slurm)" >&2; exit 2 ;;
esac
