# Sourced by the quick-start scripts: create .venv once and install the project with the given
# extras, reinstalling only when pyproject.toml or the extras change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
    echo "[recvae] creating virtual environment in $ROOT/.venv" >&2
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.recvae-install-$(cat pyproject.toml | "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')-${EXTRAS:-core}"
if [ ! -f "$stamp" ]; then
    echo "[recvae] installing recvae${EXTRAS:+[$EXTRAS]} (first run takes a few minutes)" >&2
    spec="."
    [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    touch "$stamp"
fi
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
