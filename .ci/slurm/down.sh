#!/usr/bin/env bash
# Stop the CI Slurm cluster started by up.sh: cancel its jobs, then stop the slurmd's, slurmctld
# and (only if up.sh started it) munged, through their pid files under SLURM_CI_DIR.
#
# Usage: bash .ci/slurm/down.sh    (safe to run when nothing is up)
# SLURM_CI_KEEP_MUNGE=1 leaves munged running (used by up.sh when it restarts after a config change).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Send SIGTERM to the processes in the given pid files, wait up to 10 s for all, then SIGKILL.
stop_pidfiles() {
    local f pid pids=() i alive
    for f in "$@"; do
        pid="$(live_pid "$f")" && pids+=("$pid") && kill -TERM "$pid" 2>/dev/null
    done
    for i in $(seq 1 100); do
        alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        (( alive )) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "slurm-ci: pid $pid ignored SIGTERM for 10 s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    rm -f "$@"
}

if live_pid "$SLURM_CI_DIR/run/slurmctld.pid" >/dev/null; then
    jobs="$(squeue -h -o '%i' 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 100); do
            [[ -z "$(squeue -h -t running,completing -o '%i' 2>/dev/null)" ]] && break
            sleep 0.1
        done
    fi
fi

slurmd_pidfiles=()
for node in $SLURM_CI_NODES; do
    slurmd_pidfiles+=("$SLURM_CI_DIR/run/slurmd-$node.pid")
done
stop_pidfiles "${slurmd_pidfiles[@]}"
stop_pidfiles "$SLURM_CI_DIR/run/slurmctld.pid"

if [[ "${SLURM_CI_KEEP_MUNGE:-0}" != 1 && -f "$SLURM_CI_DIR/run/munged.ours" ]]; then
    stop_pidfiles /run/munge/munged.pid
    rm -f "$SLURM_CI_DIR/run/munged.ours"
fi
echo "slurm-ci: cluster down ($SLURM_CI_DIR)"
