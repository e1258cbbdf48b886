# Sourced by scripts/slurm_local.sh and scripts/slurm_hosts.sh: the slurm.conf settings both test clusters
# share (no cgroups or accounting, CPUs as the consumable, requeue on, finished jobs kept 10 min for
# sacct-less `scontrol show job`).
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
