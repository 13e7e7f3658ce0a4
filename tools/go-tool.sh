#!/usr/bin/env bash
# Builds one pinned Go tool the chart, Argo CD and Kueue tests use, once per version, into
# ~/.cache/kubetune/go-tools/<name>-<version>/ and prints the binary's path.
#   tools/go-tool.sh helm-unittest|kubeconform|kueue|luahealth
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
name="${1:?usage: go-tool.sh helm-unittest|kubeconform|kueue|luahealth}"
case "$name" in
  helm-unittest) pkg=github.com/helm-unittest/helm-unittest/cmd/helm-unittest; version=v1.1.2 ;;
  kubeconform)   pkg=github.com/yannh/kubeconform/cmd/kubeconform; version=v0.8.0 ;;
  kueue)         pkg=sigs.k8s.io/kueue/cmd/kueue; version=v0.19.2 ;;
  # Our own runner of Argo CD health tests; keyed by its source so an edit rebuilds it.
  luahealth)     pkg=local; version="src-$(cat "$here/luahealth/"*.go "$here/luahealth/go."* | sha256sum | cut -c1-12)" ;;
  *) echo "go-tool.sh: unknown tool '$name'" >&2; exit 2 ;;
esac
out="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/go-tools/$name-$version"
if [[ -x "$out/$name" ]]; then echo "$out/$name"; exit 0; fi
command -v go >/dev/null || { echo "go-tool.sh: building $name needs Go >= 1.25 on PATH" >&2; exit 1; }
mkdir -p "$out"
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -trimpath"
start=$(date +%s)
if [[ "$pkg" == local ]]; then
  ( cd "$here/luahealth" && go build -ldflags=-s -o "$out/$name.tmp" . )
elif [[ "$name" == helm-unittest ]]; then
  # Its go.mod has a replace directive, which `go install mod@version` refuses: build it as the
  # main module, from a copy of the downloaded module.
  tmp="$(mktemp -d)"; trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT
  src="$(cd "$tmp" && go mod download -json "github.com/helm-unittest/helm-unittest@$version" \
         | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  cp -r "$src" "$tmp/src" && chmod -R u+w "$tmp/src"
  ( cd "$tmp/src" && go build -ldflags=-s -o "$out/$name.tmp" ./cmd/helm-unittest )
else
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  GOBIN="$tmp" go install -ldflags=-s "$pkg@$version"
  mv "$tmp/$(basename "$pkg")" "$out/$name.tmp"
fi
mv "$out/$name.tmp" "$out/$name"
echo "built $name $version in $(( $(date +%s) - start ))s" >&2
echo "$out/$name"
