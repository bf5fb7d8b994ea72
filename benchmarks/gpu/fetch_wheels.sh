#!/usr/bin/env bash
# Fill the wheel folder run.sh installs from, on any machine with PyPI (the GPU machine has no network):
#   bash benchmarks/gpu/fetch_wheels.sh [DIR]        # DIR defaults to benchmarks/gpu/wheels (git-ignored)
# Then copy DIR to the GPU machine with the repository (or pass run.sh --wheels DIR). Every package here is
# pure Python, so the wheels fit any Python 3 and platform; antlr4 4.9.3 ships only a source archive, which
# `pip wheel` builds into a wheel here.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${1:-$HERE/wheels}"
mkdir -p "$DIR"
python -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DIR" -r "$HERE/wheels.txt"
ls -1 "$DIR"
