#!/usr/bin/env bash
# Mutation testing of the modules that carry the proxy's guarantees: the token (cache and
# signer), header stripping, the error mapping and the failure classes behind it, the refusal
# and replay rules, the rate limiter and the callback verifier. Each mutant is one small change that a test should notice;
# benches/README.md ("Mutation testing") records the last run and why each survivor cannot
# change behaviour.
#
#   cargo install --locked cargo-mutants           # once
#   benches/mutants.sh [GROUP...] [-- EXTRA cargo-mutants ARGS]   # e.g. pace -- --list
#
# Groups: guarantees, rules, pace, callback, warm (all by default). Each group's mutants run against
# only the test targets that exercise them. Not in .ci/run: the whole run takes most of an hour
# on two cores.
#
# The tree is copied once (tracked and untracked files, not target/) into MUTANTS_TREE
# (default target/mutants-tree) and mutated there in place, so the working tree is never
# touched and the copy's build is reused by every group and every later run. A mutant that
# hangs (a refresher that never sleeps, say) is cut after MUTANTS_TIMEOUT seconds (default
# 120). Results land in mutants.out/<group>/ (outcomes.json, caught.txt, missed.txt,
# timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=${MUTANTS_TREE:-$root/target/mutants-tree}

groups=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    groups+=("$1")
    shift
done
[ $# -gt 0 ] && shift
[ ${#groups[@]} -gt 0 ] || groups=(guarantees rules pace callback warm)

mkdir -p "$tree"
find "$tree" -mindepth 1 -maxdepth 1 ! -name target -exec rm -rf {} +
# Copied files get the time of the copy (-m): a mutant interrupted by a kill may have left a
# newer build behind, which cargo, judging by times, would otherwise keep.
git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -m -C "$tree"

# No debug info: a mutant's build is then mostly the link, seconds each.
export CARGO_PROFILE_DEV_DEBUG=false

mutate() {
    local group=$1
    shift
    local select=()
    while [ "$1" != "--" ]; do
        select+=("$1")
        shift
    done
    shift
    # The test targets go to every cargo invocation, the build included: otherwise each
    # mutant's build would link all twenty test binaries.
    local targets=()
    for arg in "$@"; do
        targets+=("--cargo-arg=$arg")
    done
    mkdir -p "$root/mutants.out/$group"
    nice -n 10 cargo mutants \
        --dir "$tree" \
        --in-place \
        --package idmatch-proxy \
        --output "$root/mutants.out/$group" \
        --timeout "${MUTANTS_TIMEOUT:-120}" \
        "${select[@]}" \
        "${targets[@]}" \
        "${extra[@]}"
}

extra=("$@")
status=0
for group in "${groups[@]}"; do
    case $group in
    guarantees)
        mutate guarantees \
            --file src/token/cache.rs --file src/token/jwt.rs --file src/headers.rs \
            --file src/error.rs --file src/upstream/failure.rs \
            -- --lib --test proxy --test rewrite --test properties --test refusals \
            --test retries --test egress --test rotation
        ;;
    rules)
        # Refusals (method, authority, codings, size) and replays (never written, 401, 429).
        mutate rules --file src/proxy/refuse.rs --file src/proxy/exchange.rs \
            -- --lib --test proxy --test refusals --test retries --test hostile \
            --test properties --test egress --test pacing --test faults --test operations
        ;;
    pace)
        mutate pace --file 'src/pace/*.rs' -- --lib --test pacing --test retries
        ;;
    callback)
        mutate callback --file src/callback/verify.rs --file src/callback/dedup.rs \
            -- --lib --test callback
        ;;
    warm)
        # The connection kept open for sparse traffic: its window, its pauses, its end.
        mutate warm --file src/upstream/warm.rs -- --lib
        ;;
    *)
        echo "mutants.sh: unknown group '$group' (guarantees, rules, pace, callback, warm)" >&2
        exit 2
        ;;
    esac || status=$?
done
exit $status
