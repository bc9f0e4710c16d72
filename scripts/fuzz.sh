#!/usr/bin/env bash
# Fuzzes the code that reads customer input (crates/kiln-assets/fuzz): `decode` (any bytes as an
# upload: probe, decode, cut-out, quality judge) and `spec` (any bytes as a product spec, then copy
# and a line sheet). FUZZ_SECONDS per target (default 60); FUZZ_TARGETS to pick ("decode spec").
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
# A crash leaves its input under crates/kiln-assets/fuzz/artifacts/<target>/ and fails the run;
# replay it with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir crates/kiln-assets/fuzz <target> <file>
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-decode spec}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (once)" >&2
    cargo install --quiet cargo-fuzz --locked
fi
dir=crates/kiln-assets/fuzz
export RUSTC_BOOTSTRAP=1
for t in $targets; do
    mkdir -p "$dir/corpus/$t"
    cp -n "$dir/seeds/$t/"* "$dir/corpus/$t/"
    echo "fuzz: $t for ${seconds}s" >&2
    cargo fuzz run --fuzz-dir "$dir" "$t" "$dir/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
done
