# Sourced by scripts/slurm_local.sh and scripts/slurm_hosts.sh: the slurm.conf settings both test clusters
# share.

# root daemons, munge on the given socket. A requeued job may start again cred_expire + 1 s after it ended
# (default 120 s), and the schedulers look for it every second (defaults: backfill 30 s, main 60 s).
slurm_shared_auth() {
    cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$1,cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=1
MailProg=/bin/true
CONF
}

# no cgroups or accounting, CPUs as the consumable, requeue on, finished jobs kept 10 min
slurm_shared_settings() {
    cat <<'CONF'
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
CONF
}
