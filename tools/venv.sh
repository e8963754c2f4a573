#!/usr/bin/env bash
# Create (or reuse) .venv/ at the repo root with everything in requirements.txt.
# Usage: source tools/venv.sh   (from the repo root; exports PATH with .venv/bin first)
# Re-installs only when requirements.txt changed since the last successful install.
# Stops on the first failure; leaves the caller's `set -e` state as it found it.
case $- in *e*) _errexit=1 ;; *) _errexit=0 ;; esac
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv"
_stamp="$_venv/.requirements.sha"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[venv] creating $_venv"
  python3 -m venv "$_venv"
fi
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[venv] installing requirements.txt (first time: a few minutes)"
  "$_venv/bin/python" -m pip install -q -r "$_root/requirements.txt"
  echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export VIRTUAL_ENV="$_venv"
[ "$_errexit" = 1 ] || set +e
unset _root _venv _stamp _want _errexit
