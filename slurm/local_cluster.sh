#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (munged + slurmctld + slurmd, no systemd), for the
# tests and for trying the sbatch scripts without a cluster.
#
#   slurm/local_cluster.sh start DIR    start it; prints `export SLURM_CONF=DIR/slurm.conf`
#   slurm/local_cluster.sh stop DIR     stop it (by PID)
#   slurm/local_cluster.sh status DIR
#
# Needs root and the Debian packages slurm-wlm and munge (launch/setup.sh --slurm installs them).
set -euo pipefail
# shellcheck source=launch/options.sh
source "$(dirname "$0")/../launch/options.sh"  # usage
[[ $# -eq 2 ]] || { usage >&2; exit 2; }
CMD=$1; DIR=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$DIR/slurm.conf

stop() {
  for name in slurmd slurmctld munged; do
    if [[ -f $DIR/$name.pid ]]; then
      pid=$(cat "$DIR/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$DIR/$name.pid"
    fi
  done
}

case "$CMD" in
  stop) stop; exit 0;;
  status) SLURM_CONF=$CONF sinfo; exit 0;;
  start) ;;
  *) usage >&2; exit 2;;
esac

command -v slurmctld >/dev/null || { echo "local_cluster.sh: slurm-wlm is not installed (launch/setup.sh --slurm)" >&2; exit 1; }
stop
HOST=$(hostname -s)
mkdir -p "$DIR"/{munge,state,spool,log}
chmod 755 "$DIR/munge"          # munged refuses a socket directory others can write to
# munge: a fresh key, mode 600, owned by the user running munged
[[ -f $DIR/munge/munge.key ]] || mungekey -c -k "$DIR/munge/munge.key" 2>/dev/null \
  || dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" 2>/dev/null
chmod 600 "$DIR/munge/munge.key"
munged -S "$DIR/munge/munge.socket" --key-file "$DIR/munge/munge.key" --pid-file "$DIR/munged.pid" \
  --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/munge.seed" --force

# The node's CPU layout exactly as slurmd sees it.
NODE_LINE=$(slurmd -C | head -1 | sed 's/ UpTime.*//')
NODE_LINE=${NODE_LINE/NodeName=$HOST/NodeName=$HOST NodeAddr=127.0.0.1}
cat > "$CONF" <<EOF
ClusterName=stepdpo-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_interval=5
DependencyParameters=kill_invalid_depend
MailProg=/bin/true
MinJobAge=86400
ReturnToService=2
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=$(( 6817 + RANDOM % 1000 ))
SlurmdPort=$(( 7817 + RANDOM % 1000 ))
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF=$CONF
slurmctld -f "$CONF"
slurmd -f "$CONF" -N "$HOST"
for _ in $(seq 100); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  [[ $state == idle* ]] && { echo "export SLURM_CONF=$CONF"; exit 0; }
  sleep 0.2
done
echo "local_cluster.sh: the node did not become idle; see $DIR/log" >&2
exit 1
