#!/usr/bin/env bash
# Mutation testing of the modules that carry the proxy's guarantees: the token (cache and
# signer), header stripping and the error mapping. Each mutant is one small change that a test
# should notice; benches/README.md ("Mutation testing") records the last run and why each
# survivor cannot change behaviour.
#
#   cargo install --locked cargo-mutants     # once
#   benches/mutants.sh [EXTRA cargo-mutants ARGS...]   # e.g. --list, or -j 2
#
# Not in .ci/run: each mutant is an incremental build plus the tests below, minutes apiece on
# two cores. Only the test targets that exercise these modules run, and a mutant that hangs
# (a refresher that never sleeps, say) is cut after MUTANTS_TIMEOUT seconds (default 300).
# Results land in mutants.out/ (outcomes.json, caught.txt, missed.txt, timeout.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n 10 cargo mutants \
    --package idmatch-proxy \
    --file src/token/cache.rs \
    --file src/token/jwt.rs \
    --file src/headers.rs \
    --file src/error.rs \
    --timeout "${MUTANTS_TIMEOUT:-300}" \
    "$@" \
    -- \
    --lib \
    --test proxy \
    --test rewrite \
    --test properties \
    --test refusals \
    --test retries \
    --test egress
