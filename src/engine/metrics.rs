//! Metrics to alert on, in the Prometheus text format (`metrics/backupfs.prom` in the
//! mount, for node_exporter's textfile collector): what the catalogues hold, what runs,
//! and counters of what ended since the daemon started. Rendering only reads.

use super::restore::RestoreState;
use super::*;
use crate::targets::record::Status;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::UNIX_EPOCH;

/// Counters since start.
#[derive(Default)]
pub(super) struct Counters {
    /// (target, "available" | "error") → backups that ended so.
    backups: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// target → bytes of backup data written.
    written: Mutex<BTreeMap<String, u64>>,
    /// (target, "good" | "damaged" | "failed") → verifies that ended so.
    verifies: Mutex<BTreeMap<(String, &'static str), u64>>,
    restored: std::sync::atomic::AtomicU64,
    restore_failed: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub(super) fn backup_ended(&self, target: &str, available: bool, written: u64) {
        let result = if available { "available" } else { "error" };
        *self
            .backups
            .lock()
            .entry((target.to_string(), result))
            .or_default() += 1;
        *self.written.lock().entry(target.to_string()).or_default() += written;
    }

    pub(super) fn verify_ended(&self, target: &str, result: &'static str) {
        *self
            .verifies
            .lock()
            .entry((target.to_string(), result))
            .or_default() += 1;
    }

    /// A restore ended. A counter never goes down (Prometheus takes a decrease for a
    /// restart and counts the whole value again), so a restore that resumes after its
    /// opener's close and ends again is counted at each end.
    pub(super) fn restore_ended(&self, state: RestoreState) {
        let counter = match state {
            RestoreState::Failed => &self.restore_failed,
            RestoreState::Restored => &self.restored,
            RestoreState::Restoring => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A label value, escaped as the format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        self.samples.push((labels, value));
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (labels, value) in &self.samples {
            let _ = writeln!(out, "{}{labels} {value}", self.name);
        }
    }
}

impl Inner {
    /// The metrics, rendered now.
    pub(super) fn metrics(&self) -> String {
        let mut backups = Family::new(
            "backupfs_backups",
            "gauge",
            "Backups in the catalogue, by target and status.",
        );
        let mut stored = Family::new(
            "backupfs_stored_bytes",
            "gauge",
            "Bytes of backup data stored on the target (holes not counted).",
        );
        let mut last = Family::new(
            "backupfs_last_success_timestamp_seconds",
            "gauge",
            "When the newest available, undamaged backup of a volume completed (Unix time).",
        );
        let mut damaged = Family::new(
            "backupfs_damaged_backups",
            "gauge",
            "Available backups that a verify found damaged.",
        );
        for (name, target) in &self.targets {
            // (What a listing shows: a moment old where other nodes write the catalogue.)
            let Ok(records) = target.listed_records() else {
                continue;
            };
            let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut newest: BTreeMap<String, f64> = BTreeMap::new();
            let (mut bytes, mut bad) = (0u64, 0u64);
            for record in &records {
                *by_status.entry(record.status.as_str()).or_default() += 1;
                if record.status != Status::Available {
                    continue;
                }
                bytes += record.stored_bytes;
                if record.is_damaged() {
                    bad += 1;
                    continue;
                }
                let at = record
                    .completed_time()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let entry = newest.entry(record.volume_id.to_string()).or_insert(at);
                *entry = entry.max(at);
            }
            for status in ["creating", "available", "error", "deleting"] {
                let count = by_status.get(status).copied().unwrap_or(0);
                backups.add(&[("target", name), ("status", status)], count as f64);
            }
            stored.add(&[("target", name)], bytes as f64);
            damaged.add(&[("target", name)], bad as f64);
            for (volume, at) in newest {
                last.add(&[("target", name), ("volume_id", &volume)], at);
            }
        }
        let mut jobs = Family::new(
            "backupfs_jobs",
            "gauge",
            "Backup and verify jobs now, by target, kind and state (running or queued).",
        );
        let mut counts: BTreeMap<(String, &'static str, &'static str), u64> = BTreeMap::new();
        for target in self.targets.keys() {
            for kind in ["backup", "verify"] {
                for state in ["running", "queued"] {
                    counts.insert((target.clone(), kind, state), 0);
                }
            }
        }
        for job in self.state.lock().jobs.iter() {
            let phase = job.phase();
            if phase.ended() {
                continue;
            }
            let kind = match job.kind {
                JobKind::Backup => "backup",
                JobKind::Verify => "verify",
            };
            let state = if phase == Phase::Queued {
                "queued"
            } else {
                "running"
            };
            *counts.entry((job.target.clone(), kind, state)).or_default() += 1;
        }
        for ((target, kind, state), n) in counts {
            jobs.add(
                &[("target", &target), ("kind", kind), ("state", state)],
                n as f64,
            );
        }
        let mut completed = Family::new(
            "backupfs_backups_completed_total",
            "counter",
            "Backups that ended since backupfs started, by target and result.",
        );
        let mut written = Family::new(
            "backupfs_written_bytes_total",
            "counter",
            "Bytes of backup data written since backupfs started, by target.",
        );
        let mut verifies = Family::new(
            "backupfs_verifies_total",
            "counter",
            "Verifies that ended since backupfs started, by target and result.",
        );
        for target in self.targets.keys() {
            for result in ["available", "error"] {
                let n = self
                    .counters
                    .backups
                    .lock()
                    .get(&(target.clone(), result))
                    .copied()
                    .unwrap_or(0);
                completed.add(&[("target", target), ("result", result)], n as f64);
            }
            let bytes = self
                .counters
                .written
                .lock()
                .get(target)
                .copied()
                .unwrap_or(0);
            written.add(&[("target", target)], bytes as f64);
            for result in ["good", "damaged", "failed"] {
                let n = self
                    .counters
                    .verifies
                    .lock()
                    .get(&(target.clone(), result))
                    .copied()
                    .unwrap_or(0);
                verifies.add(&[("target", target), ("result", result)], n as f64);
            }
        }
        let mut restores = Family::new(
            "backupfs_restores_total",
            "counter",
            "Restores through the mount that ended since backupfs started, by result.",
        );
        restores.add(
            &[("result", "restored")],
            self.counters.restored.load(Ordering::Relaxed) as f64,
        );
        restores.add(
            &[("result", "failed")],
            self.counters.restore_failed.load(Ordering::Relaxed) as f64,
        );
        let mut running = Family::new(
            "backupfs_restores_running",
            "gauge",
            "Restores through the mount in progress.",
        );
        let active = self
            .restores
            .lock()
            .iter()
            .filter(|r| r.status().state == RestoreState::Restoring)
            .count();
        running.add(&[], active as f64);
        let mut out = String::new();
        for family in [
            &backups, &stored, &last, &damaged, &jobs, &completed, &written, &verifies, &restores,
            &running,
        ] {
            family.render(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("a\nb"), "a\\nb");
        let mut family = Family::new("x_total", "counter", "An x.");
        family.add(&[("t", "q\"")], 2.0);
        let mut out = String::new();
        family.render(&mut out);
        assert_eq!(
            out,
            "# HELP x_total An x.\n# TYPE x_total counter\nx_total{t=\"q\\\"\"} 2\n"
        );
    }
}
