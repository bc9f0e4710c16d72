#!/usr/bin/env bash
# Installs schemathesis (PyPI, pinned) for the OpenAPI property test (tests/tests/openapi.rs)
# into its own virtualenv under ~/.cache/kiln-tools, with Python from apt when there is none.
# Prints the path of its `st` on stdout.
set -euo pipefail
say() { echo "ensure-schemathesis: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "need root for: $*"; return 1; fi; }
version=4.32.5
venv="${KILN_TOOLS:-$HOME/.cache/kiln-tools}/schemathesis-$version"
if [ -x "$venv/bin/st" ] && "$venv/bin/st" --version >/dev/null 2>&1; then
    echo "$venv/bin/st"
    exit 0
fi
# One installer at a time (the two OpenAPI tests may ask at once); the next finds it done.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ -x "$venv/bin/st" ] && "$venv/bin/st" --version >/dev/null 2>&1; then
    echo "$venv/bin/st"
    exit 0
fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    say "installing python3 and python3-venv with apt-get (once)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
say "installing schemathesis $version into $venv (once)"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version" >&2
"$venv/bin/st" --version >&2
echo "$venv/bin/st"
