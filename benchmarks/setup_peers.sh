#!/usr/bin/env bash
# Creates the peer environment the benchmarks compare against: torchtune 0.6.1 in its own
# virtual environment (newer torchao breaks its imports), beside a CPU build of torch.
#   bash benchmarks/setup_peers.sh        -> benchmarks/.venv-torchtune
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${TORCHTUNE_VENV:-$here/.venv-torchtune}"
if [ -x "$venv/bin/tune" ]; then echo "peer venv ready: $venv"; exit 0; fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0 torchtune==0.6.1 torchao==0.14.1 \
    sentencepiece datasets tiktoken blobfile
echo "peer venv ready: $venv"
