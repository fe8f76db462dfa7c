#!/usr/bin/env bash
# Build llama.cpp's tools that the GGUF k-quant methods and the llama.cpp runtime benchmark run: llama-quantize,
# llama-imatrix, llama-bench, and keep convert_hf_to_gguf.py beside them. The source is the llama.cpp that
# llama-cpp-python vendors (PyPI is reachable where GitHub may not be). About 20 minutes on 2 cores, done once:
# a finished build is kept in $QUANTARENA_LLAMA_CPP (default ~/.cache/quantarena/llama.cpp-$VERSION).
set -euo pipefail
VERSION=0.3.36
ROOT=${QUANTARENA_LLAMA_CPP:-$HOME/.cache/quantarena/llama.cpp-$VERSION}
TOOLS=(llama-quantize llama-imatrix llama-bench)
built() {
    [ -f "$ROOT/VERSION" ] || return 1
    for t in "${TOOLS[@]}"; do [ -x "$ROOT/build/bin/$t" ] || return 1; done
}
if built; then
    echo "llama.cpp tools already built in $ROOT"
    exit 0
fi
mkdir -p "$ROOT"
cd "$ROOT"
if [ ! -f src/convert_hf_to_gguf.py ]; then
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
    rm -rf src && mkdir src
    tar xzf sdist/*.tar.gz --strip-components=3 -C src "llama_cpp_python-$VERSION/vendor/llama.cpp"
    rm -r sdist
fi
# Static tools with the CPU features of this machine (GGML_NATIVE), as a local llama.cpp user builds them.
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build build -j"$(nproc)" --target "${TOOLS[@]}" >/dev/null
echo "llama-cpp-python $VERSION" >VERSION
echo "llama.cpp tools built in $ROOT"
