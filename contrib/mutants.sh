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
#   contrib/mutants.sh plan      # copy/plan.rs with the copier's unit tests only (3 min)
#   contrib/mutants.sh engine    # engine/delete.rs, engine/recovery.rs
#   contrib/mutants.sh image     # engine/image.rs: the reader's checks
#   contrib/mutants.sh image-rest  # engine/image.rs: the rest (read_at_with, the caches...)
#   contrib/mutants.sh engine -f src/engine/backup.rs   # -f: these files instead of the group's
#   contrib/mutants.sh lib --re write_new    # further arguments go to cargo mutants
#
# Each mutant is built and tested in a copy of the tree (cargo-mutants' default) with
# target/ under $MUTANTS_TARGET (kept between runs, so only the first run builds the
# dependencies), at opt-level 0: a mutant's build is then ~15 s instead of ~40. Only the
# test binaries a group needs are built (`--cargo-arg`), one mutant at a time.
# Results: mutants.out/ in the current directory (caught.txt, missed.txt, timeout.txt,
# unviable.txt).
set -eu
cd "$(dirname "$0")/.."
group=${1:?usage: contrib/mutants.sh lib|plan|engine|image|image-rest [cargo mutants arguments]}
shift
export CARGO_TARGET_DIR="${MUTANTS_TARGET:-${TMPDIR:-/tmp}/backupfs-mutants-target}"
export CARGO_PROFILE_DEV_OPT_LEVEL=0 CARGO_PROFILE_TEST_OPT_LEVEL=0
# The group's files, unless the arguments name some (-f, --file).
own_files=false
for arg in "$@"; do
    case $arg in -f|--file|--file=*) own_files=true ;; esac
done
files() {
    $own_files || for f in "$@"; do printf -- '-f\n%s\n' "$f"; done
}
# The image reader's checks (run by `image`; `image-rest` runs everything else in the file).
checks='BackupImage::(check|expected|checked_block|read_exact|report_damage|block_is_good|damaged_blocks|verify_range|last_data_block)\b'
# Unit tests of the lib that have nothing to do with engine/image.rs (test-binary filters).
not_image='--skip config:: --skip copy:: --skip fs:: --skip ids:: --skip registry:: --skip targets:: --skip volume:: --skip engine::job --skip engine::metrics --skip engine::provenance --skip engine::request --skip engine::restore --skip engine::tests --skip engine::xattrs --skip engine::error'
set -- --jobs 1 --timeout 120 --build-timeout 900 --copy-target=false "$@"
case $group in
lib)
    # shellcheck disable=SC2046 # one file name per line, no spaces
    exec cargo mutants "$@" --cargo-arg=--lib \
        $(files src/copy/sums.rs src/copy/plan.rs src/targets/claim.rs src/targets/auth.rs) ;;
plan)
    # shellcheck disable=SC2046
    exec cargo mutants "$@" --cargo-arg=--lib $(files src/copy/plan.rs) -- copy:: ;;
engine)
    # shellcheck disable=SC2046
    exec cargo mutants "$@" --cargo-arg=--test=engine \
        $(files src/engine/delete.rs src/engine/recovery.rs) ;;
image)
    # The checks (the rest: image-rest).
    exec cargo mutants "$@" --cargo-arg=--lib --cargo-arg=--test=engine -f src/engine/image.rs \
        --re "$checks" ;;
image-rest)
    # shellcheck disable=SC2086 # the filters are words
    exec cargo mutants "$@" --cargo-arg=--lib --cargo-arg=--test=engine -f src/engine/image.rs \
        --exclude-re "$checks" -- -- $not_image ;;
*)
    echo "unknown group $group: lib, plan, engine, image or image-rest" >&2
    exit 2 ;;
esac
