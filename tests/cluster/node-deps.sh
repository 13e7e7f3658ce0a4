#!/usr/bin/env bash
# Installs the Debian packages a real node needs (container runtime, CNI plugins, image
# builder, a root-filesystem builder for stand-in base images), only those missing.
set -euo pipefail
need=()
for pair in containerd:containerd runc:runc buildah:buildah skopeo:skopeo debootstrap:debootstrap \
            iptables:iptables containernetworking-plugins:/usr/lib/cni/bridge; do
  pkg="${pair%%:*}"; probe="${pair#*:}"
  if [[ "$probe" == /* ]]; then [[ -e "$probe" ]] || need+=("$pkg")
  else command -v "$probe" >/dev/null || need+=("$pkg"); fi
done
if (( ${#need[@]} )); then
  echo "installing ${need[*]}" >&2
  if [[ $(id -u) != 0 ]]; then
    echo "node packages missing (${need[*]}) and not root: apt-get install ${need[*]}" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${need[@]}" >&2; }
fi
