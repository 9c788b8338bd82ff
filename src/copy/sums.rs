//! The checksum scheme of backups: how a block's sum is taken (`SumKind`), its 64 KiB
//! leaves' sums, and the constants the sums files are laid out by. It never changes what
//! an existing sum means: backups made before must still verify.

/// The unit of checksums (and the granularity of chunks).
pub const CHECKSUM_BLOCK: u64 = 1 << 20;

/// One checksum, of a block or of one of its leaves; 0 only for zeros. A wider digest
/// is a change here and in the encoding below: the files hold `SUM_BYTES` per sum.
pub type Sum = u64;
/// Bytes of one sum in a sums or leaf-sums file (little-endian).
pub const SUM_BYTES: usize = std::mem::size_of::<Sum>();

/// Appends `sums` to `out` as a sums or leaf-sums file holds them.
pub fn encode_sums_into(out: &mut Vec<u8>, sums: &[Sum]) {
    out.extend(sums.iter().flat_map(|s| s.to_le_bytes()));
}

/// `sums` as a sums or leaf-sums file holds them.
pub fn encode_sums(sums: &[Sum]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sums.len() * SUM_BYTES);
    encode_sums_into(&mut out, sums);
    out
}

/// The sum in the first `SUM_BYTES` of `bytes`; 0 (the sum of zeros) if they are fewer,
/// which a caller that checked the length never sees.
pub fn decode_sum(bytes: &[u8]) -> Sum {
    bytes
        .get(..SUM_BYTES)
        .and_then(|b| b.try_into().ok())
        .map_or(0, Sum::from_le_bytes)
}

/// The sums `bytes` hold, one per whole `SUM_BYTES` (callers check the length first).
pub fn decode_sums(bytes: &[u8]) -> impl Iterator<Item = Sum> + '_ {
    bytes.chunks_exact(SUM_BYTES).map(decode_sum)
}

/// The digest a record keeps of a sums file, so a damaged sums file is told from damaged
/// data: xxh3-64, in hex.
pub fn sums_file_digest(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// How the checksum of a block is taken: the record's `checksums.algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SumKind {
    /// `xxh3-64`: xxh3-64 of the whole block (backups made before leaf sums).
    Flat,
    /// `xxh3-64-leaves`: xxh3-64 of the little-endian xxh3-64 sums of the block's 64 KiB
    /// leaves. A leaf's sum can be kept beside the block's, so an incremental backup
    /// reads only the leaves that changed, not whole blocks.
    #[default]
    Leaves,
}

impl SumKind {
    /// What new backups get.
    pub const CURRENT: SumKind = SumKind::Leaves;

    pub fn name(self) -> &'static str {
        match self {
            SumKind::Flat => "xxh3-64",
            SumKind::Leaves => "xxh3-64-leaves",
        }
    }

    pub fn from_name(name: &str) -> Option<SumKind> {
        [SumKind::Flat, SumKind::Leaves]
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    /// The checksum of one block: 0 for an all-zero block (so holes need no hashing),
    /// never 0 for a block holding data.
    pub fn block_sum(self, block: &[u8]) -> Sum {
        match self {
            SumKind::Flat => flat_sum(block),
            SumKind::Leaves => {
                let mut leaves = [0; LEAVES_PER_BLOCK];
                let n = leaf_sums(block, &mut leaves);
                sum_of_leaves(&leaves[..n])
            }
        }
    }
}

/// The unit of leaf sums.
pub const LEAF: u64 = 64 << 10;
/// Leaves in a (whole) block.
pub const LEAVES_PER_BLOCK: usize = (CHECKSUM_BLOCK / LEAF) as usize;
/// Bytes of leaf sums per block in a leaf-sums file (a short last block's are padded
/// with zeros).
pub const LEAF_SUMS_PER_BLOCK_BYTES: u64 = (LEAVES_PER_BLOCK * SUM_BYTES) as u64;

/// The sums of the leaves of `block` into `out`; how many leaves it has.
pub fn leaf_sums(block: &[u8], out: &mut [Sum; LEAVES_PER_BLOCK]) -> usize {
    let mut n = 0;
    for (slot, leaf) in out.iter_mut().zip(block.chunks(LEAF as usize)) {
        *slot = flat_sum(leaf);
        n += 1;
    }
    n
}

/// A block's checksum from its leaves' sums: 0 if every leaf is zero.
pub fn sum_of_leaves(leaves: &[Sum]) -> Sum {
    if leaves.iter().all(|&l| l == 0) {
        return 0;
    }
    let mut bytes = [0u8; LEAVES_PER_BLOCK * SUM_BYTES];
    for (slot, leaf) in bytes.chunks_exact_mut(SUM_BYTES).zip(leaves) {
        slot.copy_from_slice(&leaf.to_le_bytes());
    }
    data_sum(&bytes[..leaves.len() * SUM_BYTES])
}

/// xxh3-64 of a piece, 0 for an all-zero one.
pub(super) fn flat_sum(piece: &[u8]) -> Sum {
    if is_zero(piece) {
        return 0;
    }
    data_sum(piece)
}

/// The checksum of bytes known to hold data (never 0).
fn data_sum(block: &[u8]) -> Sum {
    match xxhash_rust::xxh3::xxh3_64(block) {
        0 => 1,
        sum => sum,
    }
}

pub fn is_zero(block: &[u8]) -> bool {
    // 4 KiB at a time, OR-folded so the compiler vectorises it, stopping at the first
    // piece with data: random data costs one piece, zeros the whole scan.
    block.chunks(4096).all(|piece| {
        let words = piece.chunks_exact(16);
        let tail = words.remainder();
        let folded = words.fold(0u128, |acc, w| {
            acc | u128::from_ne_bytes(w.try_into().unwrap_or([0xff; 16]))
        });
        folded == 0 && tail.iter().all(|&b| b == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sums_files_hold_each_sum_as_eight_little_endian_bytes() {
        // The layout of every `.sums` and `.leaves` file already written: fixed.
        let bytes = encode_sums(&[1, 0x0102_0304_0506_0708]);
        assert_eq!(bytes, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        let back: Vec<Sum> = decode_sums(&bytes).collect();
        assert_eq!(back, [1, 0x0102_0304_0506_0708]);
        assert_eq!(decode_sum(&bytes[SUM_BYTES..]), 0x0102_0304_0506_0708);
        assert_eq!(decode_sum(&bytes[..3]), 0);
        assert_eq!(sums_file_digest(&bytes).len(), 16);
    }

    #[test]
    fn block_sum_of_zeros_is_zero_and_of_data_is_not() {
        assert_eq!(SumKind::Leaves.block_sum(&[0u8; 4096]), 0);
        assert_eq!(SumKind::Flat.block_sum(&[0u8; 4096]), 0);
        assert_ne!(SumKind::Flat.block_sum(b"backupfs"), 0);
        assert_ne!(SumKind::Leaves.block_sum(b"backupfs"), 0);
        assert!(is_zero(&[0u8; 17]));
        let mut v = vec![0u8; 100];
        v[99] = 1;
        assert!(!is_zero(&v));
        v[99] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        // Data that repeats (the same 16 bytes twice, a block filled with one byte) is
        // data: folding the words must not let equal ones cancel out.
        assert!(!is_zero(&[0xab; 32]));
        assert!(!is_zero(&[0xff; 4096]));
        assert_ne!(SumKind::Leaves.block_sum(&vec![0x55; MIB as usize]), 0);
    }

    // Known answers for the record's `checksums.algorithm`, written down once from the
    // python `xxhash` module (4.1.0), not from this code: a change of seed, byte order or
    // leaf size makes every existing backup fail verification, and only fixed values show it.
    // The inputs are rebuilt by `ramp` (byte i is i mod 251) so the script is one line each.
    fn ramp(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn xxh3_64_known_answers() {
        let kind = SumKind::from_name("xxh3-64");
        assert_eq!(kind, Some(SumKind::Flat));
        let flat = SumKind::Flat;
        assert_eq!(flat.block_sum(&ramp(MIB as usize)), 0x6e0d_7ac3_6b8c_10ff);
        assert_eq!(flat.block_sum(b"backupfs"), 0xe1df_0408_d286_85e5);
        assert_eq!(flat.block_sum(&ramp(100 << 10)), 0x1428_e17f_1cac_2837);
        let mut holey = vec![0u8; MIB as usize];
        holey[64 << 10..128 << 10].copy_from_slice(&ramp(64 << 10));
        assert_eq!(flat.block_sum(&holey), 0x284d_c999_0efa_bf27);
        assert_eq!(flat.block_sum(&vec![0u8; MIB as usize]), 0);
    }

    #[test]
    fn xxh3_64_leaves_known_answers() {
        let kind = SumKind::from_name("xxh3-64-leaves");
        assert_eq!(kind, Some(SumKind::Leaves));
        let leaves = SumKind::Leaves;
        // One leaf's sum is the flat sum of its 64 KiB (what the leaf-sums file holds).
        let mut sums = [0u64; LEAVES_PER_BLOCK];
        assert_eq!(leaf_sums(&ramp(MIB as usize), &mut sums), 16);
        assert_eq!(sums[0], 0xaaae_6380_0707_a868);
        assert_eq!(leaves.block_sum(&ramp(MIB as usize)), 0x3e07_2ebf_dd78_e40a);
        assert_eq!(leaves.block_sum(b"backupfs"), 0x6a5c_d336_8860_d95c);
        // A short last block: one whole leaf and a partial one.
        assert_eq!(leaves.block_sum(&ramp(100 << 10)), 0xc1a3_b900_51d6_ce12);
        // A zero leaf counts as sum 0 among the others, not skipped.
        let mut holey = vec![0u8; MIB as usize];
        holey[64 << 10..128 << 10].copy_from_slice(&ramp(64 << 10));
        assert_eq!(leaves.block_sum(&holey), 0x48af_57b0_8d55_4113);
        assert_eq!(leaves.block_sum(&vec![0u8; MIB as usize]), 0);
    }
}
