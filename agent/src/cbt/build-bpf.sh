#!/usr/bin/env bash
# Builds the changed-block tracker's BPF object from its source, reproducibly (fixed paths in
# the debug info, no host-specific flags). `--check` rebuilds into a temporary file and fails
# when the committed object differs from what the source gives.
set -euo pipefail
cd "$(dirname "$0")"
out=tracker.bpf.o
if [[ ${1:-} == --check ]]; then
  out=$(mktemp)
  trap 'rm -f "$out"' EXIT
fi
clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu -fdebug-prefix-map="$PWD"=. \
  -fno-ident -c tracker.bpf.c -o "$out"
# Debug line info and source text are not needed at load time; BTF (maps, types) is.
llvm-strip -g "$out"
if [[ ${1:-} == --check ]]; then
  cmp -s "$out" tracker.bpf.o || {
    echo "agent/src/cbt/tracker.bpf.o is not what tracker.bpf.c builds to: run agent/src/cbt/build-bpf.sh and commit it" >&2
    exit 1
  }
fi
