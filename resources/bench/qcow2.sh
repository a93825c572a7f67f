#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Compares wisp's raw and qcow2 backends with `qemu-img bench` on the same images:
# 4 KiB strided ("random") and 1 MiB sequential reads and writes, on allocated
# and unallocated qcow2 images, all synchronous (queue depth 1) through the page
# cache, without flushes (as `qemu-img bench` does by default). Reads are
# page-cache hot: they measure the backends' CPU cost, not the disk.
#
# Usage: resources/bench/qcow2.sh [WORKDIR] [SIZE_MIB]
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d)}
size_mib=${2:-512}
wisp=${WISP:-$root/target/release/wisp}

command -v qemu-img >/dev/null || { echo "qemu-img is not installed" >&2; exit 1; }
if [[ ! -x $wisp ]]; then
    (cd "$root" && cargo build --release -p vmm)
fi
mkdir -p "$work"

small_count=20000      # 4 KiB requests (80 MiB)
big_count=$((size_mib))  # 1 MiB requests (one pass over the disk)
# A stride that is not a multiple of any cluster size, so 4 KiB requests scatter.
stride=$((1048576 * 3 + 4096 * 7))

fresh() { # fresh NAME FORMAT ALLOCATED
    local img=$work/$1
    rm -f "$img"
    if [[ $2 == raw ]]; then
        dd if=/dev/urandom of="$img" bs=1M count="$size_mib" status=none
    elif [[ $3 == yes ]]; then
        qemu-img create -q -f qcow2 "$img" "${size_mib}M"
        qemu-io -f qcow2 -c "write -P 0x5a 0 ${size_mib}M" "$img" >/dev/null
    else
        qemu-img create -q -f qcow2 "$img" "${size_mib}M"
    fi
    sync "$img"
    echo "$img"
}

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }

run_pair() { # run_pair LABEL FORMAT ALLOCATED COUNT BS STEP WRITE
    local label=$1 fmt=$2 alloc=$3 count=$4 bs=$5 step=$6 write=$7
    local wflag=() img t_w t_q
    [[ $write == yes ]] && wflag=(-w)
    img=$(fresh "w.$fmt" "$fmt" "$alloc")
    t_w=$("$wisp" image bench -f "$fmt" -c "$count" -s "$bs" -S "$step" "${wflag[@]}" "$img" | secs)
    img=$(fresh "q.$fmt" "$fmt" "$alloc")
    t_q=$(qemu-img bench -f "$fmt" -t writeback -d 1 -c "$count" -s "$bs" -S "$step" "${wflag[@]}" "$img" | secs)
    local bytes=$((count * bs))
    awk -v l="$label" -v b="$bytes" -v w="$t_w" -v q="$t_q" 'BEGIN {
        mw = b / 1048576 / (w > 0 ? w : 1e-9); mq = b / 1048576 / (q > 0 ? q : 1e-9);
        printf "%-34s %10.1f %10.1f %7.2f\n", l, mw, mq, mw / mq }'
}

printf "%-34s %10s %10s %7s\n" "test (MiB/s)" "wisp" "qemu-img" "ratio"
for fmt in raw qcow2; do
    allocs=(yes)
    [[ $fmt == qcow2 ]] && allocs=(yes no)
    for alloc in "${allocs[@]}"; do
        tag=$fmt
        [[ $fmt == qcow2 ]] && tag="$fmt $([[ $alloc == yes ]] && echo allocated || echo unallocated)"
        run_pair "$tag 4K strided read" "$fmt" "$alloc" $small_count 4096 $stride no
        run_pair "$tag 4K strided write" "$fmt" "$alloc" $small_count 4096 $stride yes
        run_pair "$tag 1M sequential read" "$fmt" "$alloc" $big_count 1048576 1048576 no
        run_pair "$tag 1M sequential write" "$fmt" "$alloc" $big_count 1048576 1048576 yes
    done
done
rm -f "$work"/w.* "$work"/q.*
