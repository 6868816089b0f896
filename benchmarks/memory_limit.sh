#!/usr/bin/env bash
# Run a command under a memory limit (a cgroup of its own, no swap) and print its exit code,
# wall time and the group's peak memory: what a laptop, a container or a SLURM job with that
# much memory would see. Needs root (it makes the cgroup); cgroup v2 or v1's memory controller.
#
#   sudo bash benchmarks/memory_limit.sh 4 spp train-svm --cache W/feats --out m.safetensors
#
# Exit code 137 is the kernel's out-of-memory kill.
set -u
if [ $# -lt 2 ]; then
    echo "usage: $0 LIMIT_GB COMMAND [ARG...]" >&2
    exit 2
fi
gb=$1
shift
bytes=$((gb * 1024 * 1024 * 1024))
name="spp-memory-limit-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then  # v2
    group=/sys/fs/cgroup/$name
    mkdir "$group" || exit 1
    echo "$bytes" > "$group/memory.max"
    echo 0 > "$group/memory.swap.max" 2>/dev/null
    peak_file=$group/memory.peak
elif [ -d /sys/fs/cgroup/memory ]; then  # v1
    group=/sys/fs/cgroup/memory/$name
    mkdir "$group" || exit 1
    echo "$bytes" > "$group/memory.limit_in_bytes"
    echo 0 > "$group/memory.swappiness" 2>/dev/null
    peak_file=$group/memory.max_usage_in_bytes
else
    echo "$0: no cgroup memory controller on this machine" >&2
    exit 1
fi
start=$(date +%s.%N)
bash -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' _ "$group" "$@"
code=$?
end=$(date +%s.%N)
peak=$(cat "$peak_file" 2>/dev/null || echo 0)
awk -v gb="$gb" -v code="$code" -v s="$start" -v e="$end" -v peak="$peak" \
    'BEGIN { printf "limit %d GB: exit code %d, %.0f s, peak %.2f GB (cgroup, page cache included)\n", gb, code, e - s, peak / 1073741824 }'
rmdir "$group" 2>/dev/null
exit $code
