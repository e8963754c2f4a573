#!/usr/bin/env bash
# Create (or reuse) .venv/ at the repo root with everything in requirements.txt, and the project
# itself installed editable (pyproject.toml), so `python scripts/train_voc.py`, `python -m
# scripts.train_voc` and torchrun all find the packages from the repo root.
# Usage: source tools/venv.sh   (from anywhere; exports PATH with .venv/bin first)
# Re-installs only when requirements.txt or pyproject.toml changed since the last successful
# install. The editable install builds offline (--no-deps, no build isolation: the setuptools
# pinned in requirements.txt does it). Stops on the first failure; leaves the caller's `set -e`
# state as it found it.
case $- in *e*) _errexit=1 ;; *) _errexit=0 ;; esac
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv"
_stamp="$_venv/.requirements.sha"
_want="$(cat "$_root/requirements.txt" "$_root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[venv] creating $_venv"
  python3 -m venv "$_venv"
fi
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[venv] installing requirements.txt (first time: a few minutes) and the project (editable)"
  "$_venv/bin/python" -m pip install -q -r "$_root/requirements.txt"
  "$_venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$_root"
  echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export VIRTUAL_ENV="$_venv"
[ "$_errexit" = 1 ] || set +e
unset _root _venv _stamp _want _errexit
