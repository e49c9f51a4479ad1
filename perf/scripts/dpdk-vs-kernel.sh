#!/usr/bin/env bash
# `hive-perf chunks` against a node in the DPDK test bed (scripts/dpdk-testbed: two
# namespaces, a veth pair), once serving with --net kernel and once with --net dpdk per
# poll-mode driver (DRIVERS, default "af_xdp af_packet"), in the same run; medians of RUNS
# (default 3) per figure, and CPU cycles per request on the node (node CPU seconds x the
# CPU's clock / requests).
#
#   perf/scripts/dpdk-vs-kernel.sh [SHARDS...]      (default: 1 2)
#   BYTES=256M GET_BYTES=256M RUNS=3 DRIVERS=af_xdp perf/scripts/dpdk-vs-kernel.sh 1
set -euo pipefail
cd "$(dirname "$0")/../.."
shards_list=("$@")
[ ${#shards_list[@]} -gt 0 ] || shards_list=(1 2)
bytes="${BYTES:-256M}"
get_bytes="${GET_BYTES:-256M}"
runs="${RUNS:-3}"
read -r -a drivers <<<"${DRIVERS:-af_xdp af_packet}"
mhz=$(awk -F: '/^cpu MHz/ { printf "%d", $2; exit }' /proc/cpuinfo)
echo "cpu ${mhz} MHz; $(nproc) cores; put ${bytes} and get ${get_bytes} per run, ${runs} runs"
for shards in "${shards_list[@]}"; do
    for mode in kernel "${drivers[@]}"; do
        if [ "$mode" = kernel ]; then args=(--net kernel); else args=(--net dpdk --driver "$mode"); fi
        out=$(scripts/dpdk-testbed --shards "$shards" "${args[@]}" -- bash -c "
            \$HIVE_BIN/hive-perf chunks --node-dir \$HIVE_DATA --node-pid \$HIVE_NODE_PID --runs $runs --bytes $bytes put-unique 2>&1
            \$HIVE_BIN/hive-perf chunks --node-dir \$HIVE_DATA --node-pid \$HIVE_NODE_PID --runs $runs --get-bytes $get_bytes get 2>&1" 2>&1)
        echo "== $shards shard(s), ${args[*]}"
        echo "$out" | grep -E "^test bed|falling back|_gbps |_per_gib |p50 " | grep -v "^figure" | sed 's/^/   /'
        # Cycles per request: node CPU s/GiB x Hz / requests per GiB (1 MiB puts).
        put_cpu=$(echo "$out" | awk '$1 == "put_unique_node_cpu_s_per_gib" { print $2; exit }')
        if [ -n "$put_cpu" ]; then
            awk -v c="$put_cpu" -v m="$mhz" 'BEGIN { printf "   put: node cycles per 1 MiB request %.0f (per 4 KiB packet-equivalent %.0f)\n", c * m * 1e6 / 1024, c * m * 1e6 / 262144 }'
        fi
    done
done
