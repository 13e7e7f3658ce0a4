#!/usr/bin/env bash
# Prints the path of `promtool` or `prometheus` (Debian's `prometheus` package), installing the
# package with apt-get when it is missing (as root, or through passwordless sudo).
#   tools/prometheus.sh promtool|prometheus
set -euo pipefail
tool="${1:?usage: prometheus.sh promtool|prometheus}"
if ! command -v "$tool" >/dev/null; then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo -n"
  if ! command -v apt-get >/dev/null; then
    echo "$tool is missing: install Prometheus (Debian/Ubuntu: apt-get install prometheus)" >&2; exit 1
  fi
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq prometheus; } >&2 \
    || { echo "could not apt-get install prometheus (for $tool): install it, or run as root" >&2; exit 1; }
fi
command -v "$tool"
