//! `backupfs gc --config FILE TARGET`: a garbage collection of an `s3` target by hand,
//! safe while daemons serve it (the same handshake as theirs: it joins the target as a
//! node of its own, `<node>-gc`, so every backup in progress, this host's daemon's too,
//! is another node's and keeps it from deleting anything).

use backupfs::config::Config;
use backupfs::registry::TargetKind;
use backupfs::targets::s3;
use std::path::Path;

pub const GC_ABOUT: &str = "Free the chunks of an s3 target that no backup names any more, \
as the daemons do after each deletion, safely while daemons on any node serve the target: \
while another node has a backup in progress nothing is deleted. Prints what it found and \
freed: `target <name>: <n> chunks, <n> referenced, <n> deleted (<bytes> bytes), <n> kept`, \
and, when a backup in progress kept it from deleting, `node <node> is backing up: run again \
later`.\n\n\
Exit status: 0 when every chunk that no backup names is freed (or there was none), 3 when \
some were kept (a backup in progress on some node, or a deletion that failed: run again \
later), 2 for a configuration \
error (the file, or TARGET is not an s3 target of it), 1 for any other failure (the store \
cannot be reached, an index cannot be read: then nothing is deleted).";

pub const GC_EXAMPLES: &str =
    "Examples:\n  backupfs gc --config /etc/backupfs/backupfs.toml offsite";

/// Runs one collection of `target`; the exit status.
pub fn gc_command(config_path: &Path, target: &str) -> u8 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("backupfs gc: {line}");
            }
            return 2;
        }
    };
    let Some(found) = config.targets.get(target) else {
        eprintln!("backupfs gc: {}: no target {target}", config_path.display());
        return 2;
    };
    let TargetKind::S3(s3_config) = &found.kind else {
        eprintln!(
            "backupfs gc: target {target} is not an s3 target: only s3 targets share data that a collection frees"
        );
        return 2;
    };
    let mut node = config.node_name();
    node.truncate(61);
    let node = format!("{node}-gc");
    let opened = match s3::open_as(target, s3_config, &node, config.lease()) {
        Ok(opened) => opened,
        Err(s3::S3Error::Config { key, message }) => {
            eprintln!("backupfs gc: {key}: {message}");
            return 2;
        }
        Err(s3::S3Error::Target(e)) => {
            eprintln!("backupfs gc: target {target}: {e}");
            return 1;
        }
    };
    match opened.collect_garbage() {
        Ok(report) => {
            println!(
                "target {target}: {} chunks, {} referenced, {} deleted ({} bytes), {} kept",
                report.chunks, report.referenced, report.deleted, report.freed_bytes, report.kept
            );
            if let Some(other) = &report.deferred {
                println!("node {other} is backing up: run again later");
            }
            if report.kept > 0 { 3 } else { 0 }
        }
        Err(e) => {
            eprintln!("backupfs gc: target {target}: {e}; nothing deleted");
            1
        }
    }
}
