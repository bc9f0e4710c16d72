#!/usr/bin/env bash
# Installs s3s-fs, the S3-protocol test server (it checks SigV4 signatures), when it is missing.
set -euo pipefail
version=0.14.1
if command -v s3s-fs >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/s3s-fs" ]; then
    exit 0
fi
echo "ensure-s3s: installing s3s-fs $version (about two minutes, once)" >&2
cargo install --quiet "s3s-fs@$version" --features binary --locked
