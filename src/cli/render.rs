//! What `status` shows: rates measured between snapshots of the mount, and a snapshot in
//! its two forms, plain lines for scripts (a stable format docs/operating.md documents) and a
//! terminal view cut to its width. It formats what it is given and never reads the mount.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backupfs::targets::record::parse_rfc3339;

use super::mount::{JobLine, RestoreLine, Snapshot};

/// Progress older than this is forgotten when measuring a rate (a rolling window).
const RATE_WINDOW: Duration = Duration::from_secs(10);

// ----------------------------------------------------------------------------------------
// Rates.

/// Progress seen over the last `RATE_WINDOW`, per job: its rate is what it did since the
/// oldest sample kept (two samples a second apart in a one-shot `status`).
#[derive(Debug, Default)]
pub struct Rates {
    samples: HashMap<String, VecDeque<(Instant, u64)>>,
}

fn job_key(target: &str, job: &JobLine) -> String {
    let kind = if job.is_verify() { "verify" } else { "backup" };
    format!("{target} {} {kind}", job.backup_id)
}

fn restore_key(restore: &RestoreLine) -> String {
    format!("restore {} {}", restore.backend, restore.volume_id)
}

impl Rates {
    pub fn observe(&mut self, snapshot: &Snapshot) {
        let mut seen = HashSet::new();
        for target in &snapshot.targets {
            for job in target.active_jobs().filter(|j| !j.is_queued()) {
                let key = job_key(&target.name, job);
                self.push(&key, snapshot.taken, job.done);
                seen.insert(key);
            }
        }
        for restore in snapshot.restores.iter().flatten() {
            if restore.is_active() {
                let key = restore_key(restore);
                self.push(&key, snapshot.taken, restore.done);
                seen.insert(key);
            }
        }
        self.samples.retain(|key, _| seen.contains(key));
    }

    fn push(&mut self, key: &str, at: Instant, done: u64) {
        let samples = self.samples.entry(key.to_string()).or_default();
        // Progress that went back is a new phase (a copy after a snapshot): start over.
        if samples.back().is_some_and(|(_, last)| done < *last) {
            samples.clear();
        }
        samples.push_back((at, done));
        while samples.len() > 2
            && samples
                .front()
                .is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Bytes per second, once two samples at least half a second apart show progress.
    /// None while none is seen: the daemon counts progress in whole I/O blocks (2 MiB), so
    /// a slow copy can look still for a second without being stalled.
    pub fn rate(&self, key: &str) -> Option<f64> {
        let samples = self.samples.get(key)?;
        let ((first_at, first), (last_at, last)) = (samples.front()?, samples.back()?);
        let seconds = last_at.duration_since(*first_at).as_secs_f64();
        (seconds >= 0.5 && last > first).then(|| (last - first) as f64 / seconds)
    }

    /// Whether another sample would help: something is moving (not yet at its total)
    /// and has no rate yet.
    pub fn want_sample(&self, snapshot: &Snapshot) -> bool {
        let jobs = snapshot.targets.iter().flat_map(|t| {
            t.active_jobs()
                .filter(|j| !j.is_queued() && j.done < j.total)
                .map(|j| self.job_rate(&t.name, j))
        });
        let restores = snapshot
            .restores
            .iter()
            .flatten()
            .filter(|r| r.is_active() && (r.total == 0 || r.done < r.total))
            .map(|r| self.restore_rate(r));
        jobs.chain(restores).any(|rate| rate.is_none())
    }

    pub fn job_rate(&self, target: &str, job: &JobLine) -> Option<f64> {
        self.rate(&job_key(target, job))
    }

    pub fn restore_rate(&self, restore: &RestoreLine) -> Option<f64> {
        self.rate(&restore_key(restore))
    }
}

/// Seconds left at `rate`; None when unknown (no rate, no total, stalled).
pub fn eta(done: u64, total: u64, rate: Option<f64>) -> Option<u64> {
    let rate = rate.filter(|r| *r >= 1.0)?;
    (total > 0).then(|| (total.saturating_sub(done) as f64 / rate).ceil() as u64)
}

// ----------------------------------------------------------------------------------------
// Time.

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = backupfs::targets::record::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A duration in its two largest units: `3d 4h`, `5h 12m`, `7m 3s`, `40s`.
pub fn format_duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// How long ago `then` was, seen at `now`: `3d 4h ago` (`just now` for a time ahead of
/// this machine's clock).
pub fn format_age(then: SystemTime, now: SystemTime) -> String {
    match now.duration_since(then) {
        Ok(age) => format!("{} ago", format_duration(age.as_secs())),
        Err(_) => "just now".to_string(),
    }
}

fn age_seconds(then: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(then).map_or(0, |age| age.as_secs())
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `48.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

// ----------------------------------------------------------------------------------------
// Plain output: one line per item, the first word says what it is, fields separated by
// one space, `-` for unknown; a free text (an error) comes last. Stable: scripts parse it.

/// The plain (script) form of a snapshot; see docs/operating.md for the line formats.
pub fn render_plain(snapshot: &Snapshot, rates: &Rates) -> String {
    let mut out = String::new();
    let dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for target in &snapshot.targets {
        let t = &target.name;
        let _ = writeln!(out, "target {t}");
        for job in target.active_jobs() {
            let rate = rates.job_rate(t, job);
            let _ = writeln!(
                out,
                "job {t} {} {} {} {} {} {} {}",
                job.backup_id,
                job.volume_id,
                job.state,
                job.done,
                job.total,
                dash(rate.map(|r| r.round() as u64)),
                dash(eta(job.done, job.total, rate)),
            );
        }
        for r in target.ended() {
            let mut line = format!(
                "ended {t} {} {} {} {}",
                r.id,
                r.volume_id,
                r.status,
                r.completed_at.as_deref().unwrap_or("-")
            );
            if let Some(error) = target.failure(r) {
                line.push(' ');
                line.push_str(&error);
            }
            let _ = writeln!(out, "{line}");
        }
        for (volume_id, newest) in target.newest_per_volume() {
            let _ = match newest {
                Some(r) => writeln!(
                    out,
                    "latest {t} {volume_id} {} {} {}",
                    r.id,
                    r.completed_at.as_deref().unwrap_or("-"),
                    dash(r.completed().map(|c| age_seconds(c, snapshot.at)))
                ),
                None => writeln!(out, "latest {t} {volume_id} - - -"),
            };
        }
        for r in target.damaged() {
            let _ = writeln!(
                out,
                "damaged {t} {} {} {} {}",
                r.id,
                r.volume_id,
                r.damaged_list(),
                r.verified_at.as_deref().unwrap_or("-")
            );
        }
    }
    for restore in snapshot.restores.iter().flatten() {
        let rate = restore
            .is_active()
            .then(|| rates.restore_rate(restore))
            .flatten();
        let _ = write!(
            out,
            "restore {} {} {} {} {} {} {}",
            restore.backend,
            restore.volume_id,
            restore.state,
            restore.done,
            restore.total,
            dash(rate.map(|r| r.round() as u64)),
            dash(eta(restore.done, restore.total, rate)),
        );
        if let Some(error) = &restore.error {
            let _ = write!(out, " {error}");
        }
        out.push('\n');
    }
    out
}

// ----------------------------------------------------------------------------------------
// Terminal output: sections per target, progress bars, ages; cut to the terminal's width.

/// The terminal form of a snapshot, as lines no wider than `width` characters.
pub fn render_terminal(
    mount: &Path,
    snapshot: &Snapshot,
    rates: &Rates,
    width: usize,
) -> Vec<String> {
    let width = width.max(40);
    // Full ids need room; short ones (the first 8 characters) still tell backups apart.
    let id = |id: &str| -> String {
        if width >= 120 {
            id.to_string()
        } else {
            id.chars().take(8).collect()
        }
    };
    // Cinder's volume ids are UUIDs too: in a narrow terminal they shrink the same way,
    // so that a progress line keeps its percentage, rate and ETA (issue 23).
    let volume = |volume_id: &str| -> String {
        if width >= 120 || volume_id.chars().count() <= 12 {
            volume_id.to_string()
        } else {
            volume_id.chars().take(8).collect()
        }
    };
    let mut lines = vec![format!(
        "backupfs at {}, {}",
        mount.display(),
        format_utc(snapshot.at)
    )];
    if snapshot.targets.is_empty() {
        lines.push("no backup targets".to_string());
    }
    for target in &snapshot.targets {
        lines.push(String::new());
        lines.push(format!("target {}", target.name));
        let active: Vec<&JobLine> = target.active_jobs().collect();
        if active.is_empty() {
            lines.push("  no jobs running or queued".to_string());
        } else {
            lines.push("  running and queued".to_string());
            let volume_width = active
                .iter()
                .map(|j| volume(&j.volume_id).chars().count())
                .max()
                .unwrap_or(0)
                .min(24);
            for job in active {
                let head = format!(
                    "    {} {:<volume_width$} {:<13}",
                    id(&job.backup_id),
                    volume(&job.volume_id),
                    job.state
                );
                let rate = rates.job_rate(&target.name, job);
                lines.push(if job.is_queued() {
                    head.trim_end().to_string()
                } else {
                    progress_line(&head, job.done, job.total, rate, width)
                });
            }
        }
        let ended = target.ended();
        if !ended.is_empty() {
            lines.push("  ended".to_string());
            for r in ended {
                let when = r
                    .completed()
                    .map_or_else(|| "-".to_string(), |c| format_age(c, snapshot.at));
                let mut line = format!(
                    "    {} {} {:<9} {:>12}",
                    id(&r.id),
                    volume(&r.volume_id),
                    r.status,
                    when
                );
                match target.failure(r) {
                    Some(error) => line += &format!("  {error}"),
                    None => line += &format!("  {}", format_bytes(r.size)),
                }
                lines.push(line);
            }
        }
        let newest = target.newest_per_volume();
        if !newest.is_empty() {
            lines.push("  newest backup per volume".to_string());
            let volume_width = newest
                .keys()
                .map(|v| volume(v).chars().count())
                .max()
                .unwrap_or(0)
                .min(24);
            for (volume_id, record) in newest {
                let volume_id = volume(volume_id);
                lines.push(match record {
                    Some(r) => format!(
                        "    {volume_id:<volume_width$} {:>13}  {}",
                        r.completed()
                            .map_or_else(|| "-".to_string(), |c| format_age(c, snapshot.at)),
                        id(&r.id)
                    ),
                    None => format!("    {volume_id:<volume_width$}  no usable backup"),
                });
            }
        }
        let damaged = target.damaged();
        if !damaged.is_empty() {
            lines.push("  DAMAGED (reads of these blocks fail; make a new backup)".to_string());
            for r in damaged {
                let verified = r
                    .verified_at
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .map_or_else(String::new, |v| {
                        format!(", verified {}", format_age(v, snapshot.at))
                    });
                lines.push(format!(
                    "    ! {} {} blocks {}{verified}",
                    id(&r.id),
                    volume(&r.volume_id),
                    r.damaged_list()
                ));
            }
        }
    }
    if let Some(restores) = &snapshot.restores {
        lines.push(String::new());
        if restores.is_empty() {
            lines.push("no restores".to_string());
        } else {
            lines.push("restores".to_string());
        }
        for restore in restores {
            let name = format!("{}/{}", restore.backend, volume(&restore.volume_id));
            let head = format!("  {name} {:<9}", restore.state);
            lines.push(match &restore.error {
                Some(error) => format!("{head}  {error}"),
                None if restore.is_active() => progress_line(
                    &head,
                    restore.done,
                    restore.total,
                    rates.restore_rate(restore),
                    width,
                ),
                None => format!("{head}  {}", format_bytes(restore.done)),
            });
        }
    }
    lines.into_iter().map(|line| fit(&line, width)).collect()
}

/// `head [#####-----]  45%  12.3 MiB/s  ETA 42s`, the bar taking the room left, and
/// dropped before any number is (an unknown total shows bytes done instead).
fn progress_line(head: &str, done: u64, total: u64, rate: Option<f64>, width: usize) -> String {
    let rate_text = rate.map_or_else(String::new, |r| format!("{}/s", format_bytes(r as u64)));
    if total == 0 {
        return format!("{head} {}  {rate_text}", format_bytes(done));
    }
    let fraction = (done as f64 / total as f64).clamp(0.0, 1.0);
    let eta_text = match eta(done, total, rate) {
        Some(seconds) => format!("ETA {}", format_duration(seconds)),
        None => String::new(),
    };
    let tail = format!(
        " {:>3}%  {rate_text:>12}  {eta_text}",
        (fraction * 100.0).floor() as u64
    );
    let room = width.saturating_sub(head.chars().count() + tail.chars().count() + 3);
    if room < 5 {
        return format!("{head}{}", tail.trim_end());
    }
    let bar_width = room.min(40);
    let filled = (fraction * bar_width as f64).round() as usize;
    format!(
        "{head} [{}{}]{}",
        "#".repeat(filled),
        "-".repeat(bar_width - filled),
        tail.trim_end()
    )
}

/// A line cut to `width` characters (an ellipsis marks the cut).
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(width.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

/// The terminal's columns and rows (80x24 when standard output is not one).
pub fn terminal_size() -> (usize, usize) {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);
    // SAFETY: TIOCGWINSZ writes a winsize into the one we own.
    let got = unsafe { tiocgwinsz(libc::STDOUT_FILENO, &mut size) };
    let or = |value: u16, default: usize| match usize::from(value) {
        0 => default,
        value => value,
    };
    if got.is_ok() {
        (or(size.ws_col, 80), or(size.ws_row, 24))
    } else {
        (80, 24)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::mount::tests::{ID, job, record, snapshot};

    #[test]
    fn rfc3339_with_and_without_milliseconds_round_trips_through_the_calendar() {
        let t = parse_rfc3339("2026-11-30T07:58:41.123Z").unwrap();
        assert_eq!(format_utc(t), "2026-11-30 07:58:41 UTC");
        let whole = parse_rfc3339("2026-11-30T07:58:41Z").unwrap();
        assert_eq!(t.duration_since(whole).unwrap(), Duration::from_millis(123));
        assert_eq!(
            format_utc(parse_rfc3339("2024-02-29T23:59:59Z").unwrap()),
            "2024-02-29 23:59:59 UTC"
        );
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        for bad in [
            "",
            "2026-11-30T07:58:41",
            "2026-11-30 07:58:41Z",
            "2026-13-30T07:58:41Z",
            "2026-11-30T07:58:41.Z",
            "2026-11-30T07:5x:41Z",
            "+026-11-30T07:58:41Z",
            "2026-11-30T07:58:41.12aZ",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_show_their_two_largest_units() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(40), "40s");
        assert_eq!(format_duration(7 * 60 + 3), "7m 3s");
        assert_eq!(format_duration(5 * 3600 + 12 * 60 + 9), "5h 12m");
        assert_eq!(format_duration(3 * 86_400 + 4 * 3600 + 59), "3d 4h");
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            format_age(now - Duration::from_secs(3 * 86_400 + 4 * 3600), now),
            "3d 4h ago"
        );
        assert_eq!(format_age(now + Duration::from_secs(5), now), "just now");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(48 << 20), "48.0 MiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn rate_comes_from_progress_since_first_seen_and_restarts_when_progress_goes_back() {
        let t0 = Instant::now();
        let at = |seconds: u64, done: u64| {
            snapshot(
                t0 + Duration::from_secs(seconds),
                vec![job(ID, "v", "copying", done, 1000)],
                vec![],
            )
        };
        let copying = job(ID, "v", "copying", 0, 1000);
        let mut rates = Rates::default();
        rates.observe(&at(0, 100));
        assert_eq!(rates.job_rate("hdd", &copying), None, "one sample");
        assert!(rates.want_sample(&at(0, 100)));
        rates.observe(&at(1, 100));
        assert_eq!(
            rates.job_rate("hdd", &copying),
            None,
            "no progress seen yet"
        );
        assert!(rates.want_sample(&at(1, 100)));
        rates.observe(&at(2, 300));
        assert_eq!(rates.job_rate("hdd", &copying), Some(100.0));
        assert!(!rates.want_sample(&at(2, 300)));
        rates.observe(&at(4, 300));
        assert_eq!(
            rates.job_rate("hdd", &copying),
            Some(50.0),
            "since first seen"
        );
        assert_eq!(eta(300, 1000, Some(100.0)), Some(7));
        assert_eq!(eta(300, 1000, Some(0.0)), None);
        assert_eq!(eta(300, 0, Some(10.0)), None);
        rates.observe(&at(5, 10));
        assert_eq!(
            rates.job_rate("hdd", &copying),
            None,
            "a new phase starts over"
        );
        rates.observe(&snapshot(t0 + Duration::from_secs(6), vec![], vec![]));
        assert!(rates.samples.is_empty(), "an ended job is forgotten");
    }

    #[test]
    fn plain_output_lists_jobs_ended_newest_and_damaged_in_its_documented_form() {
        let (a, b, c) = (
            "00000000-0000-4000-8000-00000000000a",
            "00000000-0000-4000-8000-00000000000b",
            "00000000-0000-4000-8000-00000000000c",
        );
        let mut failed = job(b, "vol-b", "error", 0, 100);
        failed.error = Some("no volume vol-b (ENOENT)".to_string());
        let mut damaged = record(c, "vol-a", "available", "2033-05-18T03:00:00.000Z");
        damaged.damaged_blocks = vec![5];
        damaged.verified_at = Some("2033-05-18T03:30:00.000Z".to_string());
        let mut error_record = record(b, "vol-b", "error", "2033-05-18T02:00:00.000Z");
        error_record.error = Some("no volume vol-b (ENOENT)".to_string());
        let snap = snapshot(
            Instant::now(),
            vec![
                job(a, "vol-a", "available", 100, 100),
                failed,
                job(c, "vol-a", "available", 100, 100),
                job(a, "vol-a", "verifying", 40, 100),
                job(ID, "vol-c", "queued", 0, 100),
            ],
            vec![
                record(a, "vol-a", "available", "2033-05-18T01:33:20.000Z"),
                error_record,
                damaged,
            ],
        );
        let text = render_plain(&snap, &Rates::default());
        let expected = format!(
            "target hdd\n\
             job hdd {a} vol-a verifying 40 100 - -\n\
             job hdd {ID} vol-c queued 0 100 - -\n\
             ended hdd {a} vol-a available 2033-05-18T01:33:20.000Z\n\
             ended hdd {b} vol-b error 2033-05-18T02:00:00.000Z no volume vol-b (ENOENT)\n\
             ended hdd {c} vol-a available 2033-05-18T03:00:00.000Z\n\
             latest hdd vol-a {a} 2033-05-18T01:33:20.000Z 7200\n\
             latest hdd vol-b - - -\n\
             damaged hdd {c} vol-a 5 2033-05-18T03:30:00.000Z\n"
        );
        assert_eq!(text, expected);
        let lines = render_terminal(Path::new("/mnt/backupfs"), &snap, &Rates::default(), 80);
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
        assert!(
            lines.iter().any(|l| l.contains("[") && l.contains("40%")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("! 00000000 vol-a blocks 5")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("vol-b") && l.contains("no usable backup"))
        );
    }

    #[test]
    fn progress_bars_fit_narrow_and_wide_terminals() {
        for width in [40, 80, 200] {
            let head = "    abcdefgh vol copying      ";
            let line = progress_line(head, 60 << 20, 120 << 20, Some(1048576.0), width);
            for part in ["50%", "1.0 MiB/s", "ETA 1m 0s"] {
                assert!(line.contains(part), "{line}");
            }
            assert!(fit(&line, width).chars().count() <= width);
        }
        assert_eq!(fit("abcdef", 5), "ab...");
        let unknown = progress_line("x", 5 << 20, 0, None, 80);
        assert!(unknown.contains("5.0 MiB"), "{unknown}");
    }

    #[test]
    fn an_80_column_terminal_shows_percentage_rate_and_eta_of_cinders_uuid_volumes() {
        let volume_id = "5f0b7c1e-3a7d-4c2e-9b1a-0d6e2f4a8c31";
        let t0 = Instant::now();
        let at = |seconds: u64, done: u64| {
            snapshot(
                t0 + Duration::from_secs(seconds),
                vec![job(ID, volume_id, "copying", done, 120 << 20)],
                vec![],
            )
        };
        let mut rates = Rates::default();
        rates.observe(&at(0, 0));
        rates.observe(&at(1, 30 << 20));
        rates.observe(&at(2, 60 << 20));
        let lines = render_terminal(Path::new("/mnt/backupfs"), &at(2, 60 << 20), &rates, 80);
        let line = lines
            .iter()
            .find(|l| l.contains("copying"))
            .unwrap_or_else(|| panic!("{lines:#?}"));
        assert!(line.chars().count() <= 80, "{line}");
        for part in ["5f0b7c1e", "50%", "30.0 MiB/s", "ETA 2s"] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
        assert!(!line.contains("..."), "cut: {line}");
        // Wide enough, the whole id is shown.
        let wide = render_terminal(Path::new("/mnt/backupfs"), &at(2, 60 << 20), &rates, 170);
        assert!(wide.iter().any(|l| l.contains(volume_id)), "{wide:#?}");
    }
}
