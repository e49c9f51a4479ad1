#!/usr/bin/env bash
# Client disk benchmarks (issue 5), same run, medians of RUNS:
#   - sequential read of a warm, disk-cached 1 GiB file through `hi mount DISK` against
#     bindfs passthrough of a local copy on the same filesystem (both after drop_caches);
#   - untar of a source tree into the mount, default mode vs --writeback.
# Usage (root): perf/scripts/client-disk.sh [WORKDIR]   (release binaries in target/release
# or $CARGO_TARGET_DIR/release; needs bindfs). Removes everything it made on exit.
# UNTAR=0 skips the untar, WARM=0 the warm read; TAR_X (default "xf": "xmf" leaves mtimes
# alone, so no setattr follows each file); RUNS, SIZE_MIB as named. Debian 12: installing bindfs pulls
# fuse 2, which replaces fuse3 (reinstall fuse3 afterwards: the tests use fusermount3).
set -euo pipefail
command -v bindfs > /dev/null && bindfs --version > /dev/null 2>&1 || { echo "needs a working bindfs (see above)"; exit 1; }
B=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}/release
W=${1:-/var/tmp}/hive-client-disk-$$
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
mkdir -p "$W"/{mnt,bind,local}
HIVE_PID=""
cleanup() {
  set +e
  umount "$W/bind" 2>/dev/null
  "$B/hi" umount "$W/mnt" 2>/dev/null
  sleep 1
  [ -n "$HIVE_PID" ] && kill "$HIVE_PID" 2>/dev/null && wait "$HIVE_PID" 2>/dev/null
  umount -l "$W/mnt" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
"$B/hive" init --data "$W/hive" --size 16G --shards 2 --base-port "$port" > "$W/init.txt"
"$B/hive" run --data "$W/hive" > "$W/hive.log" 2>&1 &
HIVE_PID=$!
FP=$(grep -o '[0-9a-f]\{64\}' "$W/init.txt" | head -1)
ARGS=(--hive "127.0.0.1:$((port - 1))" --token-file "$W/hive/admin.token" --ca "$FP")
for _ in $(seq 50); do "$B/hi" volume create "${ARGS[@]}" bench --copies 1 > /dev/null 2>&1 && break; sleep 0.2; done
"$B/hi" format "${ARGS[@]}" --volume bench --secrets "$W/secrets" --journal 256M \
  --cache $((SIZE_MIB + 256))M "$W/disk.img" > /dev/null
HI_PID=""
mount_hi() { # [--writeback]
  "$B/hi" mount --secrets "$W/secrets" "$@" "$W/disk.img" "$W/mnt" >> "$W/hi.log" 2>&1 &
  HI_PID=$!
  for _ in $(seq 100); do mountpoint -q "$W/mnt" && return; sleep 0.1; done
  echo "hi did not mount"; tail "$W/hi.log"; exit 1
}
umount_hi() { "$B/hi" umount "$W/mnt"; wait "$HI_PID" || true; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mibps() { # file -> MiB/s of a 1 MiB-block sequential read after drop_caches
  sync; echo 3 > /proc/sys/vm/drop_caches
  local t0 t1; t0=$(date +%s.%N)
  dd if="$1" of=/dev/null bs=1M status=none
  t1=$(date +%s.%N)
  echo "$SIZE_MIB / ($t1 - $t0)" | bc -l
}
if [ "${WARM:-1}" = 1 ]; then
head -c $((SIZE_MIB << 20)) /dev/urandom > "$W/local/big.bin"
mount_hi
cp "$W/local/big.bin" "$W/mnt/big.bin"
umount_hi
mount_hi
"$B/hi" warmup "$W/mnt" > /dev/null 2>&1
bindfs "$W/local" "$W/bind"
hi_r=(); bind_r=()
for r in $(seq "$RUNS"); do
  umount_hi; mount_hi   # the memory cache is empty: reads come from the client disk
  hi_r+=("$(mibps "$W/mnt/big.bin")")
  bind_r+=("$(mibps "$W/bind/big.bin")")
  printf 'run %s: hi (disk cache) %.0f MiB/s, bindfs %.0f MiB/s\n' "$r" "${hi_r[-1]}" "${bind_r[-1]}"
done
"$B/hi" cache status --secrets "$W/secrets" "$W/disk.img"
h=$(printf '%s\n' "${hi_r[@]}" | median); b=$(printf '%s\n' "${bind_r[@]}" | median)
printf 'warm read: hi %.0f MiB/s, bindfs %.0f MiB/s\nratio warm_read_vs_bindfs %.3f\n' "$h" "$b" "$(echo "$h / $b" | bc -l)"
umount_hi
fi
[ "${UNTAR:-1}" = 1 ] || exit 0
# Untar: a source tree (the Rust toolchain's library sources if present, else /usr/include).
SRC=$(ls -d ~/.rustup/toolchains/*/lib/rustlib/src/rust/library 2>/dev/null | head -1 || true)
[ -n "$SRC" ] || SRC=/usr/include
tar cf "$W/src.tar" -C "$(dirname "$SRC")" "$(basename "$SRC")"
echo "tarball: $SRC, $(du -m "$W/src.tar" | cut -f1) MiB, $(tar tf "$W/src.tar" | wc -l) entries"
def_r=(); wb_r=()
for r in $(seq "$RUNS"); do
  for mode in default writeback; do
    if [ "$mode" = writeback ]; then mount_hi --writeback; else mount_hi; fi
    t0=$(date +%s.%N)
    mkdir "$W/mnt/u-$mode-$r"
    # shellcheck disable=SC2086
    tar ${TAR_X:-xf} "$W/src.tar" -C "$W/mnt/u-$mode-$r"
    sync
    t1=$(date +%s.%N)
    s=$(echo "$t1 - $t0" | bc -l)
    if [ "$mode" = writeback ]; then wb_r+=("$s"); else def_r+=("$s"); fi
    echo "run $r: untar $mode $(printf %.2f "$s") s"
    umount_hi
  done
done
d=$(printf '%s\n' "${def_r[@]}" | median); w=$(printf '%s\n' "${wb_r[@]}" | median)
printf 'untar: default %.2f s, writeback %.2f s\nratio untar_writeback_speedup %.3f\n' "$d" "$w" "$(echo "$d / $w" | bc -l)"
