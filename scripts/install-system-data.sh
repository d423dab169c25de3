#!/usr/bin/env bash
# Real image data that installs offline: Debian's Fashion-MNIST package (31 MB, MIT licence).
# Skipped when the files are already there (or SPOTTUNE_FASHION_MNIST_DIR points at them).
set -euo pipefail
dir="${SPOTTUNE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "Fashion-MNIST not found in $dir and no apt-get here: put the four *-ubyte.gz files in a folder" >&2
  echo "and set SPOTTUNE_FASHION_MNIST_DIR to it." >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian package dataset-fashion-mnist (needs root)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
