#!/usr/bin/env bash
# Sets up a fresh machine and runs the main job: the real all-MiniLM-L6-v2 compressed through the backend,
# evaluated on Wikipedia description -> article retrieval, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 panther-fx demo "$@"
