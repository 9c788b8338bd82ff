//! The thin binary: parses the command line and calls into the library.

use backupfs::config::{self, Config};
use backupfs::daemon;
use clap::{CommandFactory, Parser, Subcommand};
use cli::{demo, status, wait};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;

#[derive(Parser)]
#[command(
    name = "backupfs",
    version,
    about = "Any Cinder volume backend as backup storage, served as a filesystem",
    long_about = "backupfs mounts a tree where `echo <volume-id> > backups/<target>/request` starts an \
attach-and-copy backup, every backup is a raw image `backups/<target>/<id>.img`, and a restore is \
copying an image onto `volumes/<backend>/<volume-id>`.",
    after_help = "The daemon logs to standard error; BACKUPFS_LOG sets the filter \
(default `info,fuser=warn`; e.g. BACKUPFS_LOG=debug).\n\n\
First steps: `backupfs demo` (as root) builds a sandbox and walks through a backup and a restore."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount the tree and serve it in the foreground until SIGTERM, SIGINT or umount.
    #[command(
        long_about = "Mount the tree and serve it in the foreground until SIGTERM, SIGINT, SIGHUP, \
SIGQUIT or umount. Stopping cancels running backups (recorded as `error`, partial data removed) and \
detaches the mount. A stale mount left at MOUNTPOINT by a daemon that died (\"Transport endpoint is \
not connected\") is detached first.\n\n\
Exit status: 0 after a clean stop, 2 for a configuration error, 1 for any other failure \
(for instance a target locked by another backupfs).",
        after_help = "Examples:\n  backupfs mount /mnt/backupfs --config /etc/backupfs/backupfs.toml\n  \
BACKUPFS_LOG=debug backupfs mount /mnt/backupfs --config ./backupfs.toml"
    )]
    Mount {
        /// Where to mount (an existing empty directory).
        mountpoint: PathBuf,
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check a configuration without mounting; names the offending key on error.
    #[command(
        long_about = "Check a configuration without mounting: parse it, then check it against the \
disk (pool directories exist and are readable, no target's pool overlaps a volume pool, \
admin_group exists, each target's key file is a key that only root can read; each s3 target's files are \
read and its gateway asked for the bucket, checking an https certificate; nothing is written). Prints `<path>: ok`, \
then `target <name>: no key: records are not authenticated` for each target without a key, and exits \
with status 0, or prints every error, one line each naming its key, and exits with status 2."
    )]
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Write a new random target key to FILE (mode 0600; an existing FILE is never replaced).
    #[command(
        long_about = "Write a new random 256-bit target key to FILE, one line of 64 hex digits, \
mode 0600. FILE must not exist: a key is never overwritten (nor a link at that name followed). \
Name it as `key` of a target in the configuration, and copy the same file (mode 0600) to every node \
that serves the target: records and their checksums are then sealed with it, and a record whose \
MAC does not check is damaged.\n\n\
Exit status: 0 when the key is written, 1 otherwise (FILE exists, or cannot be written).",
        after_help = "Examples:\n  backupfs keygen /etc/backupfs/hdd.key"
    )]
    Keygen {
        /// The key file to create.
        file: PathBuf,
    },
    /// Free the chunks of an s3 target that no backup names, safely while daemons run.
    #[command(long_about = cli::gc::GC_ABOUT, after_help = cli::gc::GC_EXAMPLES)]
    Gc {
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// The s3 target to collect.
        target: String,
    },
    /// Build a throw-away sandbox, mount it, and walk through a backup and a restore.
    #[command(
        long_about = "Build a throw-away sandbox (two `file` backends, a backup target, three \
sample volumes and a configuration), mount it at DIR/mnt in this process, and walk through a \
backup and a restore made through the mount with ordinary shell commands, each printed before it \
runs. Needs no configuration; run it as root.\n\n\
The demo then stays mounted until Ctrl-C, so you can try the commands it suggests. It stops by \
itself after the walk-through when standard input is not a terminal or BACKUPFS_DEMO_EXIT=1 is \
set (for scripts and CI). On the way out it unmounts and removes what it made: DIR itself when \
the demo created it, otherwise only its own entries; never while something is still mounted \
inside DIR.\n\n\
Exit status: 0 when the walk-through succeeded and the sandbox is removed, 1 otherwise.",
        after_help = "Examples:\n  sudo backupfs demo\n  BACKUPFS_DEMO_EXIT=1 backupfs demo /tmp/demo"
    )]
    Demo {
        /// The sandbox: a new or empty directory (default: a new temporary directory).
        dir: Option<PathBuf>,
    },
    /// Show jobs with their progress, ended jobs, each volume's newest backup, damaged ones.
    #[command(long_about = status::STATUS_ABOUT, after_help = status::STATUS_EXAMPLES)]
    Status {
        /// The backupfs mountpoint.
        #[arg(long, value_name = "DIR", default_value = cli::DEFAULT_MOUNT)]
        mount: PathBuf,
        /// Redraw every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Wait until a backup has ended; exit 0 when it is available, non-zero with the reason.
    #[command(long_about = wait::WAIT_ABOUT, after_help = wait::WAIT_EXAMPLES)]
    Wait {
        /// The backupfs mountpoint.
        #[arg(long, value_name = "DIR", default_value = cli::DEFAULT_MOUNT)]
        mount: PathBuf,
        /// Give up after SECS seconds (exit status 4).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// The backup's id, as reading `request` after the write gave it.
        backup_id: String,
    },
    /// Print the manual page (roff), generated from this command line's definition.
    #[command(hide = true)]
    Man,
}

fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKUPFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn main() -> ExitCode {
    let code = run(Cli::parse());
    if backupfs::volume::rbd::ffi::loaded() {
        // librados' threads still run (its clients live until exit), and exit() would run
        // Ceph's static destructors under them: a `check-config` of an RBD configuration
        // was seen to print its answer and then die of a signal. Everything backupfs
        // writes is synced before this point; only stdio's buffers are left to flush.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: _exit ends the process at once; nothing after it runs.
        unsafe { libc::_exit(i32::from(code)) };
    }
    ExitCode::from(code)
}

/// Runs a command; its exit status.
fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Mount { mountpoint, config } => {
            // Before any thread exists, so every thread inherits the blocked mask.
            if let Err(e) = daemon::block_stop_signals() {
                eprintln!("backupfs: {e}");
                return 1;
            }
            init_logging("info,fuser=warn");
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(e) => {
                    for line in e.to_string().lines() {
                        tracing::error!("{line}");
                    }
                    return 2;
                }
            };
            match daemon::serve(config, &mountpoint) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e}");
                    if e.is_config() { 2 } else { 1 }
                }
            }
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(loaded) => {
                println!("{}: ok", config.display());
                for note in loaded.notes() {
                    println!("{note}");
                }
                0
            }
            Err(e) => {
                // Every error of the configuration, one line each.
                for line in e.to_string().lines() {
                    eprintln!("backupfs: {line}");
                }
                2
            }
        },
        Command::Keygen { file } => match backupfs::targets::auth::generate(&file) {
            Ok(()) => {
                println!("{}: new key written", file.display());
                0
            }
            Err(e) => {
                eprintln!("backupfs keygen: {e}");
                1
            }
        },
        Command::Gc { config, target } => {
            // Its warnings only: what it found and freed is printed.
            init_logging("warn");
            cli::gc::gc_command(&config, &target)
        }
        Command::Demo { dir } => {
            // As for `mount`: the walk-through thread must inherit the blocked mask.
            if let Err(e) = daemon::block_stop_signals() {
                eprintln!("backupfs: {e}");
                return 1;
            }
            // The daemon's warnings (refusals) only: its info lines would bury the script.
            init_logging("warn,fuser=error");
            match demo::run(dir) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("backupfs demo: {e}");
                    1
                }
            }
        }
        Command::Status { mount, watch } => status::status_command(&mount, watch),
        Command::Wait {
            mount,
            timeout,
            backup_id,
        } => wait::wait_command(
            &mount,
            &backup_id,
            timeout.map(std::time::Duration::from_secs),
        ),
        Command::Man => {
            match cli::man::render(Cli::command())
                .and_then(|page| std::io::stdout().write_all(page.as_bytes()))
            {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("backupfs: {e}");
                    1
                }
            }
        }
    }
}
