#!/usr/bin/env bash
# The demo command: set up .venv, then run the whole pipeline on the demo preset (demo.py).
# DATA_DIR=path/to/data runs it offline on local files; otherwise small public subsets are
# downloaded from the Hugging Face Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec .venv/bin/python demo.py "$@"
