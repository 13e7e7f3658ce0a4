#!/usr/bin/env bash
# Builds the real kube-apiserver, kube-controller-manager and etcd from their Go modules,
# once per version, into a cache outside the repo. Prints the bin folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.5
RECIPE=2   # bump when the build itself changes (flags), so cached binaries are rebuilt
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/cluster-${K8S_VERSION}-etcd-${ETCD_VERSION}-r${RECIPE}"
bin="$cache/bin"
if [[ -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" && -x "$bin/etcd" ]]; then
  echo "$bin"; exit 0
fi
mkdir -p "$bin"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cp -r "$here/k8s" "$here/etcd" "$work/"
start=$(date +%s)
( cd "$work/etcd" && go mod tidy >&2 && go build -trimpath -ldflags=-s -o "$bin/etcd.tmp" . && mv "$bin/etcd.tmp" "$bin/etcd" )
( cd "$work/k8s" && go mod tidy -e >&2 || true
  cd "$work/k8s" && go get k8s.io/kubernetes@"$K8S_VERSION" >&2
  # The version stamps a release build sets (hack/lib/version.sh): /version says v1.35.4, so a
  # chart's kubeVersion and kubectl's skew check judge this server as they would a real one.
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  stamp=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  for cmd in kube-apiserver kube-controller-manager; do
    go build -trimpath -ldflags="-s$stamp" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" && mv "$bin/$cmd.tmp" "$bin/$cmd"
  done )
echo "built control plane in $(( $(date +%s) - start ))s" >&2
echo "$bin"
