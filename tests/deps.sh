#!/usr/bin/env bash
# The test environment's dependencies, on purpose rather than by surprise.
#
#   bash tests/deps.sh lock     rewrite tests/requirements.lock: every package the README's test
#                               command installs, pinned at the newest release that pyproject.toml's
#                               ranges allow today (pip-tools, pip's own resolver and indexes)
#   bash tests/deps.sh latest   in a fresh venv, install the newest release of every dependency
#                               (no lock) and run the suite, to see drift before the lock moves
#
# torch stays at 2.13.0 in both: on these machines a newer torch is a multi-GB CUDA build
# (docs/quickstart.md, "Install"). pyproject.toml keeps its ranges for users.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
TORCH=torch==2.13.0
EXTRAS=test

case "${1:-}" in
  lock)
    pin=$(mktemp); trap 'rm -f "$pin"' EXIT
    echo "$TORCH" > "$pin"
    python -m pip install -q pip-tools
    python -m piptools compile -q --upgrade --extra "$EXTRAS" --strip-extras --allow-unsafe \
      --no-emit-index-url --no-emit-find-links --constraint "$pin" \
      --output-file tests/requirements.lock pyproject.toml
    # The header names a temporary pin file: name this command instead.
    sed -i "s|^#    pip-compile .*|#    bash tests/deps.sh lock   (pip-compile, with $TORCH as a constraint)|; s|-c $pin|-c $TORCH|" \
      tests/requirements.lock
    echo "tests/requirements.lock: $(grep -c '==' tests/requirements.lock) packages pinned"
    ;;
  latest)
    venv=${VENV:-$(mktemp -d)/venv}
    python -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$TORCH" -e ".[$EXTRAS]"
    "$venv/bin/python" -m pip freeze --exclude-editable > "$venv/../installed.txt"
    echo "newest releases: $(grep -cE '==' "$venv/../installed.txt") packages (list: $venv/../installed.txt)"
    # The venv's own pip and setuptools are not the project's: left out of the comparison.
    drift=$(diff <(grep -E '^[A-Za-z0-9_.-]+==' tests/requirements.lock | tr 'A-Z_' 'a-z-' | grep -vE '^(pip|setuptools)==' | sort) \
                 <(tr 'A-Z_' 'a-z-' < "$venv/../installed.txt" | sort) | grep -E '^[<>]' || true)
    echo "${drift:-no drift from the lock}"
    PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest "${@:2}"
    ;;
  *)
    echo "usage: bash tests/deps.sh lock | latest [PYTEST ARGS]" >&2
    exit 2
    ;;
esac
