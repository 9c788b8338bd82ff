#!/bin/sh
# Mutation testing (cargo-mutants) of the modules where a bug loses data: the copier's
# checksums and incremental planning, the claim and the record MACs (unit tests), and
# the image reader's checks, deletion and recovery (unit tests and tests/engine.rs, the
# tier without root or FUSE). Not run in CI: a few hundred builds. The mutants that
# survived the last run, and why each is harmless or which test now kills it, are in
# contrib/mutants.md.
#
#   cargo install cargo-mutants --locked     # 27.1 was used
#   contrib/mutants.sh lib       # copy/sums.rs, copy/plan.rs, targets/claim.rs, targets/auth.rs
#   contrib/mutants.sh engine    # engine/delete.rs, engine/recovery.rs
#   contrib/mutants.sh image     # engine/image.rs: the reader's checks
#   contrib/mutants.sh lib -f src/copy/sums.rs      # further arguments go to cargo mutants
#
# Each mutant is built and tested in a copy of the tree (cargo-mutants' default) with
# target/ under $MUTANTS_TARGET (kept between runs, so only the first run builds the
# dependencies), at opt-level 0: a mutant's build is then ~15 s instead of ~40. Only the
# test binaries a group needs are built (`--cargo-arg`), one mutant at a time.
# Results: mutants.out/ in the current directory (caught.txt, missed.txt, timeout.txt,
# unviable.txt).
set -eu
cd "$(dirname "$0")/.."
group=${1:?usage: contrib/mutants.sh lib|engine|image [cargo mutants arguments]}
shift
export CARGO_TARGET_DIR="${MUTANTS_TARGET:-${TMPDIR:-/tmp}/backupfs-mutants-target}"
export CARGO_PROFILE_DEV_OPT_LEVEL=0 CARGO_PROFILE_TEST_OPT_LEVEL=0
set -- --jobs 1 --timeout 120 --build-timeout 900 --copy-target=false "$@"
case $group in
lib)
    exec cargo mutants "$@" --cargo-arg=--lib \
        -f src/copy/sums.rs -f src/copy/plan.rs -f src/targets/claim.rs -f src/targets/auth.rs ;;
engine)
    exec cargo mutants "$@" --cargo-arg=--test=engine \
        -f src/engine/delete.rs -f src/engine/recovery.rs ;;
image)
    # The checks (not yet: read_at_with's arithmetic, block_range, CheckedImage's
    # BlockDevice plumbing, the caches' bookkeeping; add `--re read_at_with` and so on).
    exec cargo mutants "$@" --cargo-arg=--lib --cargo-arg=--test=engine -f src/engine/image.rs \
        --re 'BackupImage::(check|expected|checked_block|read_exact|report_damage|block_is_good|damaged_blocks|verify_range|last_data_block)\b' ;;
*)
    echo "unknown group $group: lib, engine or image" >&2
    exit 2 ;;
esac
