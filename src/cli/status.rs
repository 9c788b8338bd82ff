//! `backupfs status`: reads snapshots of the mount (one, or two a second apart to measure
//! rates; with `--watch` one a second) and prints them for a terminal or a script. It reads
//! only the mounted tree and never writes to it.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use super::emit;
use super::mount::{Mount, MountError, Reader};
use super::render::{Rates, render_plain, render_terminal, terminal_size};

/// How far apart the two samples of a one-shot `status` are, and a `--watch` frame's period.
const SAMPLE: Duration = Duration::from_secs(1);
/// A one-shot `status` looks again at most this many times to measure rates.
const MAX_EXTRA_SAMPLES: usize = 2;

/// `backupfs status --help`, and its section of the manual page.
pub const STATUS_ABOUT: &str = "Show, per target, the backups and verifies running and queued \
(in a terminal with a progress bar, percentage, rate and ETA), the last five ended backups \
(newest last, failed ones with their error; from the records, so also those `jobs` no longer \
lists), each volume's newest available backup and its age \
(a backup a verify found damaged does not count), and the backups a verify found damaged; then \
the restores, when the mount lists them. It reads only the mounted tree (`jobs`, the records, \
`restores`), as any script could. Measuring rates takes a second or two when something is \
moving.\n\n\
When standard output is not a terminal it prints plain lines instead, one per item: fields \
separated by one space, `-` when unknown, a free text (an error) last, times as the records \
write them (RFC 3339), rates in bytes per second, ETA and age in seconds:\n\n  \
target TARGET\n  \
job TARGET BACKUP-ID VOLUME-ID STATE DONE TOTAL RATE ETA\n  \
ended TARGET BACKUP-ID VOLUME-ID available|error COMPLETED-AT [ERROR]\n  \
latest TARGET VOLUME-ID BACKUP-ID|- COMPLETED-AT AGE\n  \
damaged TARGET BACKUP-ID VOLUME-ID BLOCK,BLOCK... VERIFIED-AT\n  \
restore BACKEND VOLUME-ID STATE DONE TOTAL RATE ETA [ERROR]\n\n\
A `latest` line with `-` for BACKUP-ID names a volume with no usable backup in that target \
(all failed, still running, or damaged).\n\n\
With --watch it redraws every second until Ctrl-C (plain: one block of lines per second, each \
ended by an empty line).\n\n\
Exit status: 0; 1 when MOUNT is not there or not a backupfs mount, or cannot be read (one line \
on standard error says which).";
pub const STATUS_EXAMPLES: &str = "Examples:\n  backupfs status\n  backupfs status --watch\n  \
backupfs status --mount /mnt/backupfs | awk '$1 == \"damaged\"'";

/// `backupfs status`: its exit status (0, or 1 with one line on standard error when the
/// mount cannot be read).
pub fn status_command(mount: &Path, watch: bool) -> u8 {
    match status(mount, watch) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("backupfs status: {e}");
            1
        }
    }
}

fn status(mount: &Path, watch: bool) -> Result<(), MountError> {
    let terminal = std::io::stdout().is_terminal();
    let mut reader = Reader::new(Mount::open(mount)?);
    let mut rates = Rates::default();
    let mut snapshot = reader.snapshot()?;
    rates.observe(&snapshot);
    if !watch {
        // A rate needs another look a second later, sometimes two.
        for _ in 0..MAX_EXTRA_SAMPLES {
            if !rates.want_sample(&snapshot) {
                break;
            }
            std::thread::sleep(SAMPLE);
            snapshot = reader.snapshot()?;
            rates.observe(&snapshot);
        }
        let text = if terminal {
            let (width, _) = terminal_size();
            let mut text = render_terminal(mount, &snapshot, &rates, width).join("\n");
            text.push('\n');
            text
        } else {
            render_plain(&snapshot, &rates)
        };
        emit(&text);
        return Ok(());
    }
    let mut first = true;
    loop {
        let text = if terminal {
            let (width, height) = terminal_size();
            let mut lines = render_terminal(mount, &snapshot, &rates, width);
            lines.push("(Ctrl-C to stop)".to_string());
            // One row short of the screen, so that the last line never scrolls it.
            let room = height.saturating_sub(1).max(2);
            if lines.len() > room {
                let hidden = lines.len() - (room - 1);
                lines.truncate(room - 1);
                lines.push(format!(
                    "... {hidden} more lines (a taller terminal shows them)"
                ));
            }
            // Home, each line over the old one and the rest of the screen cleared: no flicker.
            let mut frame = String::from(if first { "\x1b[H\x1b[2J" } else { "\x1b[H" });
            frame += &lines.join("\x1b[K\n");
            frame += "\x1b[K\x1b[J";
            frame
        } else {
            // Blocks of plain lines, each ended by an empty line.
            render_plain(&snapshot, &rates) + "\n"
        };
        if !emit(&text) {
            return Ok(());
        }
        first = false;
        let next = snapshot.taken + SAMPLE;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        snapshot = reader.snapshot()?;
        rates.observe(&snapshot);
    }
}
