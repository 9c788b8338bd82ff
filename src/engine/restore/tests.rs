use super::*;

const MIB: u64 = 1 << 20;

#[test]
fn sequential_writes_start_writeback_per_piece_and_drop_a_window_behind() {
    let mut writeback = Writeback::default();
    let mut kicks = Vec::new();
    for i in 0..48 {
        if let Some(kick) = writeback.wrote(i * MIB, (i + 1) * MIB) {
            kicks.push(kick);
        }
    }
    let starts: Vec<_> = kicks.iter().map(|k| k.start.clone()).collect();
    assert_eq!(
        starts,
        [0..8 * MIB, 8 * MIB..16 * MIB, 16 * MIB..24 * MIB]
            .into_iter()
            .chain([24 * MIB..32 * MIB, 32 * MIB..40 * MIB, 40 * MIB..48 * MIB])
            .collect::<Vec<_>>()
    );
    let dropped: Vec<_> = kicks.iter().filter_map(|k| k.dropped.clone()).collect();
    assert_eq!(dropped, [0..8 * MIB, 8 * MIB..16 * MIB]);
}

#[test]
fn a_write_out_of_sequence_starts_a_new_run() {
    let mut writeback = Writeback::default();
    for i in 0..7 {
        assert_eq!(writeback.wrote(i * MIB, (i + 1) * MIB), None);
    }
    // A seek (dd seek=, a hole cp skipped): what came before is left to the kernel.
    assert_eq!(writeback.wrote(100 * MIB, 101 * MIB), None);
    for i in 101..107 {
        assert_eq!(writeback.wrote(i * MIB, (i + 1) * MIB), None);
    }
    assert_eq!(
        writeback.wrote(107 * MIB, 108 * MIB),
        Some(Kick {
            start: 100 * MIB..108 * MIB,
            dropped: None
        })
    );
    // Writing the same place again is no progress either.
    assert_eq!(writeback.wrote(107 * MIB, 108 * MIB), None);
}
