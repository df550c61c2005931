#!/usr/bin/env bash
# Quick start, command 2: set up and run the test suite (CPU only; real-data tests need
# ../shared/data and skip without it; `-m slow` runs the slow real-data tests).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "dev"
exec .venv/bin/python -m pytest "$@"
