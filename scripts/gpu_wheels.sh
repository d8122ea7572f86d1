#!/usr/bin/env bash
# Wheels a GPU machine without network needs to run scripts/gpu_device_run.sh, downloaded here into .whl/
# (ignored by git; ~21 MB) at the versions this checkout's .venv runs, for the machine's Python 3.12.
# The machine already has torch, accelerate, numpy, pillow, pyarrow, pandas, safetensors, tqdm, pyyaml,
# regex, psutil, click, rich, ...; these are what the project adds on top (its pins and their new deps).
# Checked against a copy of that machine's package list with `python -S` and only those packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NAMES="transformers huggingface_hub datasets torchdata peft hydra-core omegaconf dill multiprocess tokenizers
       httpx2 httpcore2 truststore typer hydra-submitit-launcher hydra-optuna-sweeper submitit"
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
pins=$($PY -m pip freeze 2>/dev/null | grep -i -E "^($(echo $NAMES | tr ' ' '|'))==" )
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as a source archive only: build its wheel here.
$PY -m pip wheel -q --no-deps -w .whl "$($PY -m pip freeze | grep -i '^antlr4-python3-runtime==')"
ls .whl
