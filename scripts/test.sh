#!/usr/bin/env bash
# The test command: set up .venv, then run the offline CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
