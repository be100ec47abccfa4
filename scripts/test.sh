#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite (CUDA tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q "$@"
# The documentation site must build without warnings (mkdocs.yml, docs/).
python -m mkdocs build --strict --quiet --site-dir "${TMPDIR:-/tmp}/panther_fx_site"
