#!/usr/bin/env bash
# Prints the crates whose features differ between a build of the proxy alone and a build of the
# mock (which links the proxy): each is a crate that switching between `cargo run` and `cargo run
# -p idmatch-mock` would rebuild, to be listed in hack/Cargo.toml. No output: nothing to add.
set -euo pipefail
cd "$(dirname "$0")/.."
features() {
  cargo tree -p "$1" -e normal,build --prefix none -f '{p} [{f}]' |
    sed 's/ (\*)//; s/ (proc-macro)//' | sort -u
}
join -t'|' <(features idmatch-proxy | sed 's/ \[/|[/' | sort) \
  <(features idmatch-mock | sed 's/ \[/|[/' | sort) |
  awk -F'|' '$2 != $3 { print $1 ": proxy " $2 ", mock " $3 }'
