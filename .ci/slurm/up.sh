#!/usr/bin/env bash
# Start a single-host Slurm cluster for CI: munged, slurmctld and one slurmd per emulated node.
#
# Usage: bash .ci/slurm/up.sh      (as root; idempotent: rerunning on a running cluster is a no-op)
#
# Installs the Debian packages when missing, writes "$SLURM_CI_DIR/slurm.conf" (default
# /tmp/captioner-slurm) and its copy /etc/slurm/slurm.conf, maps the node names to 127.0.0.1 in
# /etc/hosts, starts the daemons directly (no systemd) and waits until sinfo shows every node
# idle. Settings: see common.sh (SLURM_CI_DIR, SLURM_CI_NODES, SLURM_CI_CPUS, ...).
# SLURM_CI_FORCE=1 allows replacing an /etc/slurm/slurm.conf this script did not write.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ "$(id -u)" == 0 ]] || die "run as root (the daemons and /etc/slurm, /etc/hosts need it)"

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sinfo sbatch srun munged munge; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    [[ -x /usr/sbin/slurmctld ]] || missing=1
    (( missing )) || return 0
    echo "slurm-ci: installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

render_config() {
    local host port i=0 node
    host="$(hostname -s)"
    {
        echo "$SLURM_CI_MARKER"
        sed -e "s|@HOST@|$host|g" -e "s|@DIR@|$SLURM_CI_DIR|g" \
            -e "s|@CTLD_PORT@|$SLURM_CI_CTLD_PORT|g" "$SLURM_CI_SCRIPTS/slurm.conf.in"
        for node in $SLURM_CI_NODES; do
            port=$((SLURM_CI_NODE_PORT + i))
            i=$((i + 1))
            echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$host Port=$port" \
                "CPUs=$SLURM_CI_CPUS RealMemory=$SLURM_CI_MEM_MB State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(echo $SLURM_CI_NODES | tr ' ' ',')" \
            "Default=YES MaxTime=INFINITE State=UP"
    }
}

# Write $2 to $1 through a temp file in the same folder and a rename.
write_atomic() {
    local tmp
    tmp="$(mktemp "$(dirname "$1")/.$(basename "$1").XXXXXX")"
    printf '%s\n' "$2" > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$1"
}

install_config() {
    local conf
    conf="$(render_config)"
    mkdir -p "$SLURM_CI_DIR"/{state,spool,log,run} /etc/slurm
    for node in $SLURM_CI_NODES; do mkdir -p "$SLURM_CI_DIR/spool/$node"; done
    if [[ -f "$SLURM_CI_DIR/slurm.conf" ]] && [[ "$(cat "$SLURM_CI_DIR/slurm.conf")" != "$conf" ]]; then
        echo "slurm-ci: configuration changed; restarting the Slurm daemons"
        SLURM_CI_KEEP_MUNGE=1 bash "$SLURM_CI_SCRIPTS/down.sh"
    fi
    if [[ -f "$SLURM_ETC_CONF" ]] && ! grep -qxF "$SLURM_CI_MARKER" "$SLURM_ETC_CONF" \
        && [[ "${SLURM_CI_FORCE:-0}" != 1 ]]; then
        die "$SLURM_ETC_CONF exists and was not written by this script; move it away or set SLURM_CI_FORCE=1"
    fi
    write_atomic "$SLURM_CI_DIR/slurm.conf" "$conf"
    write_atomic "$SLURM_ETC_CONF" "$conf"
}

# Lightning takes the first node name of the job as MASTER_ADDR, so every name must resolve.
map_hosts() {
    local node
    for node in $SLURM_CI_NODES; do
        if ! grep -qE "^127\.0\.0\.1[[:space:]].*[[:space:]]$node([[:space:]]|$)" /etc/hosts; then
            echo "127.0.0.1 $node  # captioner slurm ci" >> /etc/hosts
        fi
        getent hosts "$node" >/dev/null || die "node name $node does not resolve after editing /etc/hosts"
    done
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0   # a munged is already serving the default socket
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
    chmod 0755 /run/munge
    chmod 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    touch "$SLURM_CI_DIR/run/munged.ours"
    local i
    for i in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    tail -n 20 /var/log/munge/munged.log >&2 || true
    die "munged did not start (log above: /var/log/munge/munged.log)"
}

start_slurm() {
    local node
    if ! live_pid "$SLURM_CI_DIR/run/slurmctld.pid" >/dev/null; then
        # -c: start clean (no jobs from an earlier run), -i: ignore unreadable state files.
        /usr/sbin/slurmctld -f "$SLURM_CI_DIR/slurm.conf" -c -i \
            || die "slurmctld failed to start"
    fi
    for node in $SLURM_CI_NODES; do
        if ! live_pid "$SLURM_CI_DIR/run/slurmd-$node.pid" >/dev/null; then
            /usr/sbin/slurmd -f "$SLURM_CI_DIR/slurm.conf" -N "$node" \
                || die "slurmd for $node failed to start"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + SLURM_CI_WAIT_S)) states want
    want="$(for n in $SLURM_CI_NODES; do echo "$n idle"; done | sort)"
    while :; do
        states="$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u || true)"
        [[ "$states" == "$want" ]] && break
        # A node left down/drained by an earlier run comes back once it responds again.
        if grep -qE ' (down|drain|drng|fail)' <<<"$states"; then
            for n in $SLURM_CI_NODES; do
                scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
            done
        fi
        (( SECONDS < deadline )) || die "nodes not idle after ${SLURM_CI_WAIT_S}s; sinfo says: ${states:-nothing (controller unreachable)}"
        sleep 0.5
    done
    echo "slurm-ci: cluster up ($SLURM_CI_DIR): $(echo $states | tr '\n' ' ')"
}

install_packages
install_config
map_hosts
start_munge
start_slurm
wait_idle
