#!/usr/bin/env bash
# kiln's benchmarks, each beside an anchor measured in the same run (docs/BENCHMARKS.md):
#   ledger: reserve+commit pairs per second vs pgbench -N (simple-update) TPS, same server, same
#           clients, runs interleaved;
#   assets: the 2000 px master and whole kits from a 4000x4000 JPEG vs vipsthumbnail making a
#           2000 px thumbnail of the same file, all pinned to one core;
#   queue:  reserve+enqueue transactions per second vs pgbench -N, idle pickup latency over
#           sequential jobs, and queue + ledger overhead as a share of an Essentials kit.
# BENCH=ledger, BENCH=assets or BENCH=queue runs one of them. Prints Markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${BENCH:-all}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

if [ "$which" = all ] || [ "$which" = assets ]; then
    if ! command -v vipsthumbnail >/dev/null; then
        echo "bench: installing libvips-tools for vipsthumbnail" >&2
        if [ "$(id -u)" = 0 ]; then apt-get install -y -qq libvips-tools >/dev/null; else sudo apt-get install -y -qq libvips-tools >/dev/null; fi
    fi
    cargo build -q --release -p kiln-assets --example kit_bench
    out=$(realpath -m "${CARGO_TARGET_DIR:-target}/kit-bench")
    runs=${BENCH_RUNS:-5}
    results=$(taskset -c 0 "${CARGO_TARGET_DIR:-target}/release/examples/kit_bench" "$out" "$runs")
    vips=()
    for _ in $(seq 1 "$runs"); do
        t0=$(date +%s%N)
        VIPS_CONCURRENCY=1 taskset -c 0 vipsthumbnail "$out/upload.jpg" -s 2000 -o "$out/vips.jpg[Q=92]"
        vips+=("$(( ($(date +%s%N) - t0) / 1000 ))")
    done
    m_vips=$(printf '%s\n' "${vips[@]}" | median | awk '{ printf "%.1f", $1 / 1000 }')
    get() { printf '%s\n' "$results" | awk -v k="$1" '$1 == k { print $2 }'; }
    cat <<MD

| 4000x4000 JPEG upload, one core, median of $runs | ms | vs vipsthumbnail -s 2000 |
|---|---|---|
| vipsthumbnail -s 2000 (whole process) | $m_vips | 1.00 |
| kiln decode alone | $(get decode) | $(ratio "$(get decode)" "$m_vips") |
| kiln 2000x2000 master (decode, cut-out, place on white, encode) | $(get master) | $(ratio "$(get master)" "$m_vips") |
| kiln Essentials kit | $(get essentials) | $(ratio "$(get essentials)" "$m_vips") |
| kiln Caratzon kit | $(get caratzon) | $(ratio "$(get caratzon)" "$m_vips") |
MD
fi
if [ "$which" = all ] || [ "$which" = ledger ] || [ "$which" = queue ]; then

clients=${BENCH_CLIENTS:-8}
seconds=${BENCH_SECONDS:-5}
runs=${BENCH_RUNS:-5}
admin=${KILN_TEST_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
root=${admin%/*}

command -v pgbench >/dev/null || { echo "pgbench is missing (Debian: postgresql-contrib / postgresql-client)"; exit 1; }
recreate() { psql "$admin" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" >/dev/null; }
recreate kiln_bench_pgbench
pgbench -q -i -s "$clients" "$root/kiln_bench_pgbench" >/dev/null 2>&1
pgbench_tps() {
    pgbench -n -N -c "$clients" -j "$clients" -T "$seconds" "$root/kiln_bench_pgbench" 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
fi

if [ "$which" = all ] || [ "$which" = ledger ]; then
cargo build -q --release -p kiln-ledger --example ledger_bench
bench_bin=${CARGO_TARGET_DIR:-target}/release/examples/ledger_bench

kiln_own=() kiln_shared=() pg=()
for i in $(seq 1 "$runs"); do
    recreate kiln_bench_ledger
    kiln_own+=("$("$bench_bin" "$root/kiln_bench_ledger" "$clients" "$seconds")")
    recreate kiln_bench_ledger
    kiln_shared+=("$("$bench_bin" "$root/kiln_bench_ledger" "$clients" "$seconds" shared)")
    pg+=("$(pgbench_tps)")
    echo "run $i: kiln ${kiln_own[-1]} pairs/s (own accounts), ${kiln_shared[-1]} (one account); pgbench -N ${pg[-1]} tps" >&2
done
psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_ledger WITH (FORCE)" >/dev/null

m_own=$(printf '%s\n' "${kiln_own[@]}" | median)
m_shared=$(printf '%s\n' "${kiln_shared[@]}" | median)
m_pg=$(printf '%s\n' "${pg[@]}" | median)
cat <<MD

| measure ($clients clients, ${seconds}s x $runs runs, median) | per second | vs pgbench -N |
|---|---|---|
| pgbench -N (simple-update) transactions | $m_pg | 1.00 |
| kiln reserve+commit pairs, one account per client | $m_own | $(ratio "$m_own" "$m_pg") |
| kiln reserve+commit pairs, all clients on one account | $m_shared | $(ratio "$m_shared" "$m_pg") |
MD
fi

if [ "$which" = all ] || [ "$which" = queue ]; then
cargo build -q --release -p kit-worker --example queue_bench
qbin=${CARGO_TARGET_DIR:-target}/release/examples/queue_bench
enq=() pg=() ratios=()
for i in $(seq 1 "$runs"); do
    recreate kiln_bench_queue
    enq+=("$("$qbin" "$root/kiln_bench_queue" enqueue "$clients" "$seconds")")
    pg+=("$(pgbench_tps)")
    ratios+=("$(ratio "${enq[-1]}" "${pg[-1]}")")
    echo "run $i: reserve+enqueue ${enq[-1]} tx/s; pgbench -N ${pg[-1]} tps; ratio ${ratios[-1]}" >&2
done
recreate kiln_bench_queue
pickup_jobs=${BENCH_PICKUP_JOBS:-1000}
read -r p50 p99 < <("$qbin" "$root/kiln_bench_queue" pickup "$pickup_jobs")
recreate kiln_bench_queue
kits=${BENCH_KITS:-21}
read -r e2e gen pub over share < <("$qbin" "$root/kiln_bench_queue" overhead "$kits")
psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_queue WITH (FORCE)" >/dev/null
m_enq=$(printf '%s\n' "${enq[@]}" | median)
m_pg=$(printf '%s\n' "${pg[@]}" | median)
m_ratio=$(printf '%s\n' "${ratios[@]}" | median)
min_ratio=$(printf '%s\n' "${ratios[@]}" | sort -g | head -1)
cat <<MD

| queue ($clients clients, ${seconds}s x $runs runs) | value | vs anchor |
|---|---|---|
| pgbench -N (simple-update) transactions per second, median | $m_pg | 1.00 |
| reserve + enqueue per second (one guarded statement: hold, kit_jobs row, apalis task; wake-up after commit), median | $m_enq | $m_ratio (median of same-run ratios; lowest $min_ratio; goal >= 0.5) |
| idle pickup, enqueue start -> claim, $pickup_jobs sequential jobs: p50 / p99 | $p50 ms / $p99 ms | goal < 10 / < 50 ms |
| Essentials kit through the queue, end to end (median of $kits) | $e2e ms | 1.00 |
| the same kit rendered directly / its files published directly (reference) | $gen ms / $pub ms | |
| queue + ledger overhead per kit (end to end less the worker's own render and writes), median | $over ms | $(awk -v s="$share" 'BEGIN { printf "%.1f%%", s * 100 }') of the kit (goal < 5%) |
MD
fi
psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_pgbench WITH (FORCE)" >/dev/null 2>&1 || true
