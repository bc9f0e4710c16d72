#!/usr/bin/env bash
# Ledger benchmark: kiln reserve+commit pairs per second against pgbench -N (simple-update)
# transactions per second, same server, same number of clients, runs interleaved so both see
# the same machine. Prints medians and the ratio as a Markdown table for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

clients=${BENCH_CLIENTS:-8}
seconds=${BENCH_SECONDS:-5}
runs=${BENCH_RUNS:-5}
admin=${KILN_TEST_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
root=${admin%/*}

command -v pgbench >/dev/null || { echo "pgbench is missing (Debian: postgresql-contrib / postgresql-client)"; exit 1; }
cargo build -q --release -p kiln-ledger --example ledger_bench
bench_bin=${CARGO_TARGET_DIR:-target}/release/examples/ledger_bench

recreate() { psql "$admin" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" >/dev/null; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

recreate kiln_bench_pgbench
pgbench -q -i -s "$clients" "$root/kiln_bench_pgbench" >/dev/null 2>&1

kiln_own=() kiln_shared=() pg=()
for i in $(seq 1 "$runs"); do
    recreate kiln_bench_ledger
    kiln_own+=("$("$bench_bin" "$root/kiln_bench_ledger" "$clients" "$seconds")")
    recreate kiln_bench_ledger
    kiln_shared+=("$("$bench_bin" "$root/kiln_bench_ledger" "$clients" "$seconds" shared)")
    pg+=("$(pgbench -n -N -c "$clients" -j "$clients" -T "$seconds" "$root/kiln_bench_pgbench" 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p')")
    echo "run $i: kiln ${kiln_own[-1]} pairs/s (own accounts), ${kiln_shared[-1]} (one account); pgbench -N ${pg[-1]} tps" >&2
done
psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_ledger WITH (FORCE)" -c "DROP DATABASE IF EXISTS kiln_bench_pgbench WITH (FORCE)" >/dev/null

m_own=$(printf '%s\n' "${kiln_own[@]}" | median)
m_shared=$(printf '%s\n' "${kiln_shared[@]}" | median)
m_pg=$(printf '%s\n' "${pg[@]}" | median)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
cat <<MD

| measure ($clients clients, ${seconds}s x $runs runs, median) | per second | vs pgbench -N |
|---|---|---|
| pgbench -N (simple-update) transactions | $m_pg | 1.00 |
| kiln reserve+commit pairs, one account per client | $m_own | $(ratio "$m_own" "$m_pg") |
| kiln reserve+commit pairs, all clients on one account | $m_shared | $(ratio "$m_shared" "$m_pg") |
MD
