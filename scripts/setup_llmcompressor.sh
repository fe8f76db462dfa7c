#!/usr/bin/env bash
# llmcompressor in its own environment for the llmc-* methods: llmcompressor 0.14 pins transformers<=5.17, older
# than this project's, so it gets a virtual environment that sees the installed packages (torch is not
# installed twice) and keeps its own transformers and compressed-tensors. quantarena runs it as a program and
# loads what it writes (compressed-tensors checkpoints) with this environment's transformers. ~30 s, once:
# kept in $QUANTARENA_LLMCOMPRESSOR (default ~/.cache/quantarena/llmcompressor-$VERSION).
set -euo pipefail
VERSION=0.14.0.1
ROOT=${QUANTARENA_LLMCOMPRESSOR:-$HOME/.cache/quantarena/llmcompressor-$VERSION}
if "$ROOT/bin/python" -c "import llmcompressor" 2>/dev/null; then
    echo "llmcompressor already installed in $ROOT"
    exit 0
fi
python -m venv --system-site-packages "$ROOT"
"$ROOT/bin/python" -m pip install -q "llmcompressor==$VERSION"
echo "llmcompressor $VERSION installed in $ROOT"
