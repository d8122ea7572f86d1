#!/usr/bin/env bash
# Single-node SLURM cluster on 127.0.0.1 for vlm_sweep's tests, without systemd.
#
#   scripts/local_slurm.sh up       install (if missing) and start munged, MariaDB, slurmdbd,
#                                   slurmctld and slurmd; wait until the node is idle
#   scripts/local_slurm.sh down     cancel jobs, stop what `up` started (pid files only)
#                                   `down --purge` also deletes the state dir
#   scripts/local_slurm.sh status   print whether it is up (exit 0 up, 3 down/partial)
#   scripts/local_slurm.sh env      print `export SLURM_CONF=...`; use: eval "$(... env)"
#
# Everything (configs, munge key + socket, MariaDB datadir + socket, slurm state, spool,
# logs, pid files) lives under one state dir; nothing is written to /etc, /run or /var
# (apart from what apt itself installs). Needs root (apt, SlurmUser=root).
#
# Environment:
#   LOCAL_SLURM_DIR           state dir                                  [/tmp/vlm_sweep_slurm]
#   LOCAL_SLURM_PARTITION     name of the (default) partition            [debug]
#   LOCAL_SLURM_PORT          first of 4 ports: slurmctld, slurmd,
#                             slurmdbd, MariaDB (all bound to 127.0.0.1) [6817]
#   LOCAL_SLURM_OVERSUBSCRIBE jobs allowed per CPU (OverSubscribe=FORCE:N; 1 = no
#                             oversubscription, extra jobs queue)        [4]
#   LOCAL_SLURM_DEF_MEM       DefMemPerCPU in MB (jobs without --mem)    [1024]
#   LOCAL_SLURM_TIMEOUT       seconds to wait for each daemon / the idle node [60]
set -euo pipefail

BASE=$(realpath -m "${LOCAL_SLURM_DIR:-/tmp/vlm_sweep_slurm}")
PART=${LOCAL_SLURM_PARTITION:-debug}
PORT=${LOCAL_SLURM_PORT:-6817}
OVERSUB=${LOCAL_SLURM_OVERSUBSCRIBE:-4}
DEF_MEM=${LOCAL_SLURM_DEF_MEM:-1024}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CLUSTER=vlmsweep

CTLD_PORT=$PORT SLURMD_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3))
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log MUNGE=$BASE/munge DB=$BASE/mysql
CONF=$ETC/slurm.conf
MUNGE_SOCK=$MUNGE/munge.socket
DB_SOCK=$RUN/mariadb.sock
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# daemon name -> pid file; the daemon's executable has the same basename
declare -A PIDFILE=(
  [munged]=$MUNGE/munged.pid
  [mariadbd]=$RUN/mariadbd.pid
  [slurmdbd]=$RUN/slurmdbd.pid
  [slurmctld]=$RUN/slurmctld.pid
  [slurmd]=$RUN/slurmd.pid
)
START_ORDER=(munged mariadbd slurmdbd slurmctld slurmd)

T0=$(date +%s%N)
log() {
  local ms=$((($(date +%s%N) - T0) / 1000000))
  printf '[local_slurm %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*" >&2
}
die() {
  log "ERROR: $*"
  [ "${1:-}" = "must run as root" ] || log "daemons already started keep running: '$0 down' stops them"
  local f
  for f in "$LOG"/{mariadb,slurmdbd,slurmctld,slurmd}.log "$MUNGE"/munged.log; do
    [ -s "$f" ] && { printf -- '--- tail %s\n' "$f" >&2; tail -n 20 "$f" >&2; }
  done
  exit 1
}
wait_for() { # wait_for SECONDS CMD...: poll CMD until it succeeds; 1 on timeout
  local end=$(($(date +%s) + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$end" ] && return 1
    sleep 0.2
  done
}

# ------------------------------------------------------------------ ownership
# A pid is "ours" only if it is alive, runs the expected executable and names this
# state dir on its command line or in its environment (so a recycled pid, or a
# system slurmd/munged/mariadbd, is never touched).
pid_alive() { # alive and not a zombie (pid 1 here may be slow to reap orphans)
  local stat
  [[ $1 =~ ^[0-9]+$ ]] && { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  case ${stat%% *} in Z | X | x) return 1 ;; esac
}
ours() { # ours PID EXE_BASENAME
  local pid=$1 exe
  pid_alive "$pid" || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}; exe=${exe##*/}
  [ "$exe" = "$2" ] || [ "$exe" = "$2-wlm" ] || return 1   # Debian: /usr/sbin/slurmd -> slurmd-wlm
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$BASE/" && return 0
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"
}
scan_ours() { # scan_ours EXE...: print NAME:PID for each live process of ours running one of them
  local p pid exe n
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    exe=${exe% (deleted)}; exe=${exe##*/}; exe=${exe%-wlm}
    for n in "$@"; do
      if [ "$exe" = "$n" ] && ours "$pid" "$n"; then echo "$n:$pid"; fi
    done
  done
}
running() { # running DAEMON: prints the pid if our daemon is up; drops a stale pid file
  local pf=${PIDFILE[$1]} pid
  [ -f "$pf" ] || return 1
  pid=$(head -c 32 "$pf" 2>/dev/null | tr -dc 0-9)
  if ours "$pid" "$1"; then echo "$pid"; return 0; fi
  rm -f "$pf"
  return 1
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
check_port() { # check_port DAEMON PORT: before starting DAEMON, its port must be free
  port_busy "$2" && die "port $2 (for $1) is already in use by something else; set LOCAL_SLURM_PORT"
  return 0
}

# ------------------------------------------------------------------ install
POLICY_CREATED=0
cleanup_policy() { [ "$POLICY_CREATED" = 1 ] && rm -f /usr/sbin/policy-rc.d; POLICY_CREATED=0; }
install_packages() {
  local p missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing: ${missing[*]}"
  # Keep the packages' maintainer scripts from starting the system's own munge/mariadb/
  # slurm services: we start private instances ourselves.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    POLICY_CREATED=1
    trap cleanup_policy EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=120 update -qq >"$LOG/apt.log" 2>&1 \
    || { tail -n 20 "$LOG/apt.log" >&2; die "apt-get update failed"; }
  apt-get -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold install -y -q --no-install-recommends "${missing[@]}" \
    >>"$LOG/apt.log" 2>&1 || { tail -n 30 "$LOG/apt.log" >&2; die "apt-get install failed"; }
  cleanup_policy
  log "installed"
}

# ------------------------------------------------------------------ config
write_configs() {
  local cpus boards sockets cores threads mem hw oversub
  hw=$(slurmd -C 2>/dev/null | head -n 1) || die "slurmd -C failed"
  cpus=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  boards=$(sed -n 's/.*\bBoards=\([0-9]*\).*/\1/p' <<<"$hw")
  sockets=$(sed -n 's/.*\bSocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
  cores=$(sed -n 's/.*\bCoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
  threads=$(sed -n 's/.*\bThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.*\bRealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  if [ -z "$cpus" ] || [ -z "$mem" ]; then die "cannot parse 'slurmd -C': $hw"; fi
  if [ "$OVERSUB" -gt 1 ] 2>/dev/null; then oversub="FORCE:$OVERSUB"; else oversub=NO; fi

  cat >"$CONF.new" <<EOF
# Generated by scripts/local_slurm.sh -- edits are overwritten by the next 'up'.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# private munged socket; cred_expire: a requeued job becomes eligible again after
# ~cred_expire seconds (default 120)
AuthInfo=cred_expire=5,socket=$MUNGE_SOCK
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# accounting is required: without sacct, submitit never sees a cancelled job finish
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the munged to use towards slurmdbd (AuthInfo's socket is not used for that)
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# without a default every job without --mem gets the whole node's memory
DefMemPerCPU=$DEF_MEM
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$mem State=UNKNOWN
# OverSubscribe=FORCE:N lets N jobs share a CPU, so e.g. a 3-task array runs at once on 2 CPUs
PartitionName=$PART Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=$oversub
EOF
  CONF_CHANGED=0
  if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else mv "$CONF.new" "$CONF"; CONF_CHANGED=1; fi

  [ -s "$ETC/db.pass" ] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$ETC/db.pass"); }
  # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF; must be 0600
  (umask 077; cat >"$ETC/slurmdbd.conf.new" <<EOF
# Generated by scripts/local_slurm.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=${PIDFILE[slurmdbd]}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF
  )
  DBD_CONF_CHANGED=0
  if cmp -s "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"; then rm -f "$ETC/slurmdbd.conf.new"
  else mv "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"; DBD_CONF_CHANGED=1; fi
  chmod 600 "$ETC/slurmdbd.conf"
  echo "export SLURM_CONF=$CONF" >"$BASE/env.sh"
}

# ------------------------------------------------------------------ daemons
stop_daemons() { # stop_daemons NAME...: TERM (then KILL) our daemons, found via their pid files
  local name pid i alive names=() pids=()
  for name in "$@"; do
    if pid=$(running "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      names+=("$name"); pids+=("$pid")
    fi
    rm -f "${PIDFILE[$name]}"
  done
  for ((i = 0; i < 150; i++)); do # 30 s
    alive=0
    for pid in "${pids[@]}"; do pid_alive "$pid" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for i in "${!pids[@]}"; do
    if pid_alive "${pids[$i]}"; then
      log "${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 30s: SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    else
      log "${names[$i]} stopped (pid ${pids[$i]})"
    fi
  done
}

start_munged() {
  local pid
  if pid=$(running munged); then log "munged already running (pid $pid)"; return; fi
  install -d -m 0755 "$MUNGE"   # munged insists the socket dir is 0755, key 0600
  if [ ! -s "$MUNGE/munge.key" ]; then
    (umask 077; if command -v mungekey >/dev/null; then mungekey --create --keyfile="$MUNGE/munge.key"
     else dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none; fi)
  fi
  chmod 600 "$MUNGE/munge.key"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"  # leftovers of a killed munged (no munged of ours is alive)
  munged --socket="$MUNGE_SOCK" --key-file="$MUNGE/munge.key" --pid-file="${PIDFILE[munged]}" \
    --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" \
    </dev/null >>"$LOG/munged.out" 2>&1 9>&- || die "munged failed to start"
  wait_for 10 sh -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'" || die "munged does not answer"
  log "munged started (pid $(running munged))"
}

start_mariadb() {
  local pid
  if pid=$(running mariadbd); then log "mariadbd already running (pid $pid)"
  else
    check_port mariadbd "$DB_PORT"
    if [ ! -f "$DB/.vlm_sweep_initialized" ]; then
      rm -rf "$DB"; install -d -m 0700 "$DB"
      mariadb-install-db --no-defaults --user=root --datadir="$DB" --auth-root-authentication-method=socket \
        --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
      touch "$DB/.vlm_sweep_initialized"
    fi
    rm -f "$DB_SOCK" "$DB_SOCK.lock"
    setsid -f mariadbd --no-defaults --user=root --datadir="$DB" --socket="$DB_SOCK" \
      --pid-file="${PIDFILE[mariadbd]}" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --log-error="$LOG/mariadb.log" --skip-log-bin --skip-name-resolve \
      --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-use-native-aio=0 \
      --innodb-lock-wait-timeout=900 </dev/null >>"$LOG/mariadbd.out" 2>&1 9>&-
    wait_for "$TIMEOUT" mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping \
      || die "mariadbd did not come up"
    wait_for 10 running mariadbd || die "mariadbd wrote no pid file"
    log "mariadbd started (pid $(running mariadbd))"
  fi
  local pw; pw=$(cat "$ETC/db.pass")
  mariadb --no-defaults --socket="$DB_SOCK" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "creating the slurm DB user failed"
}

start_slurmdbd() {
  local pid
  if pid=$(running slurmdbd); then
    if [ "$DBD_CONF_CHANGED" = 0 ]; then log "slurmdbd already running (pid $pid)"; return; fi
    log "slurmdbd.conf changed: restarting slurmdbd"; stop_daemons slurmdbd
  fi
  check_port slurmdbd "$DBD_PORT"
  slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 9>&- || die "slurmdbd failed to start"
  wait_for "$TIMEOUT" sacctmgr -n show cluster || die "slurmdbd does not answer"
  log "slurmdbd started (pid $(running slurmdbd))"
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
  fi
}

start_slurm() {
  local d pid
  if [ "$CONF_CHANGED" = 1 ]; then
    for d in slurmd slurmctld; do
      if running "$d" >/dev/null; then log "slurm.conf changed: restarting $d"; fi
    done
    stop_daemons slurmd slurmctld
  fi
  if pid=$(running slurmctld); then log "slurmctld already running (pid $pid)"
  else
    check_port slurmctld "$CTLD_PORT"
    # -i: tolerate missing/corrupt state left by an earlier run
    slurmctld -i -f "$CONF" </dev/null >>"$LOG/slurmctld.out" 2>&1 9>&- || die "slurmctld failed to start"
    wait_for 15 running slurmctld || die "slurmctld did not stay up"
    log "slurmctld started (pid $(running slurmctld))"
  fi
  if pid=$(running slurmd); then log "slurmd already running (pid $pid)"
  else
    check_port slurmd "$SLURMD_PORT"
    mkdir -p "$BASE/spool"
    slurmd -f "$CONF" </dev/null >>"$LOG/slurmd.out" 2>&1 9>&- || die "slurmd failed to start"
    wait_for 15 running slurmd || die "slurmd did not stay up"
    log "slurmd started (pid $(running slurmd))"
  fi
}

wait_idle() {
  local end=$(($(date +%s) + TIMEOUT)) st
  while :; do
    st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
    case $st in
      idle* | mixed* | allocated*) break ;;
      down* | drain* | fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    [ "$(date +%s)" -ge "$end" ] && die "node $NODE not idle after ${TIMEOUT}s (state: ${st:-no answer})"
    sleep 0.2
  done
  log "node $NODE is $st, partition $PART; clients need: export SLURM_CONF=$CONF"
}

lock() {
  [ -d "$BASE" ] || install -d -m 0755 "$BASE"   # munged wants its socket dir reachable by all
  exec 9>"$BASE/.lock"
  flock -w 300 9 || die "another local_slurm.sh holds $BASE/.lock"
}

# ------------------------------------------------------------------ commands
cmd_up() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  lock
  mkdir -p "$ETC" "$RUN" "$LOG" "$BASE/state" "$BASE/spool"
  export SLURM_CONF=$CONF
  install_packages
  write_configs
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurm
  wait_idle
}

cmd_down() {
  local purge=0 d jobs left
  [ "${1:-}" = --purge ] && purge=1
  if [ ! -d "$BASE" ]; then log "nothing to stop ($BASE does not exist)"; return 0; fi
  lock
  export SLURM_CONF=$CONF
  if running slurmctld >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # shellcheck disable=SC2016 # expanded by sh -c
      wait_for 30 sh -c '[ -z "$(squeue -h 2>/dev/null)" ]' || log "jobs still listed after 30s: $(squeue -h | tr '\n' ';')"
    fi
  fi
  # each running step has a socket in the spool dir until its slurmstepd exits
  wait_for 15 sh -c "! ls '$BASE/spool' 2>/dev/null | grep -q '^${NODE}_'" || true
  stop_daemons slurmd slurmctld
  for d in $(scan_ours slurmstepd); do # step daemons of ours that outlived slurmd
    log "killing leftover ${d/:/ }"; kill -KILL "${d#*:}" 2>/dev/null || true
  done
  stop_daemons slurmdbd
  stop_daemons mariadbd munged
  rm -f "$BASE/spool/${NODE}_"* 2>/dev/null || true
  left=$(scan_ours "${START_ORDER[@]}" slurmstepd | tr '\n' ' ')
  [ -z "$left" ] || die "still running after down: $left"
  if [ $purge = 1 ]; then
    if [ "$BASE" != / ] && grep -qs '^# Generated by scripts/local_slurm.sh' "$CONF"; then
      exec 9>&-; rm -rf "$BASE"; log "removed $BASE"
    else
      log "not removing $BASE: it does not look like a local_slurm.sh state dir"
    fi
  fi
  log "down"
}

cmd_status() {
  local d pid up=0 total=${#START_ORDER[@]} st
  for d in "${START_ORDER[@]}"; do
    if pid=$(running "$d" 2>/dev/null); then printf '%-10s running (pid %s)\n' "$d" "$pid"; up=$((up + 1))
    else printf '%-10s stopped\n' "$d"; fi
  done
  if [ "$up" = "$total" ]; then
    st=$(SLURM_CONF=$CONF sinfo -h -n "$NODE" -o '%P %T %c CPUs %m MB' 2>/dev/null || true)
    echo "local slurm: up (node $NODE: ${st:-no answer}); SLURM_CONF=$CONF"
    [ -n "$st" ] && return 0
    return 3
  fi
  if [ "$up" = 0 ]; then echo "local slurm: down ($BASE)"; else echo "local slurm: partially up ($up/$total daemons)"; fi
  return 3
}

case "${1:-}" in
  up) cmd_up ;;
  down) shift; cmd_down "$@" ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down [--purge]|status|env   (state dir: \$LOCAL_SLURM_DIR=$BASE)" >&2; exit 2 ;;
esac
