//! The thin binary: parses the command line and calls into the library.

use backupfs::config::{self, Config};
use backupfs::{daemon, demo};
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "backupfs",
    version,
    about = "Any Cinder volume backend as backup storage, served as a filesystem",
    long_about = "backupfs mounts a tree where `echo <volume-id> > backups/<target>/request` starts an \
attach-and-copy backup, every backup is a raw image `backups/<target>/<id>.img`, and a restore is \
copying an image onto `volumes/<backend>/<volume-id>`.",
    after_help = "The daemon logs to standard error; BACKUPFS_LOG sets the filter \
(default `info,fuser=warn`; e.g. BACKUPFS_LOG=debug).\n\
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
        after_help = "Example: backupfs mount /mnt/backupfs --config /etc/backupfs/backupfs.toml"
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
admin_group exists). Prints `<path>: ok`, or the error naming the key, and exits with status 2."
    )]
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Build a throw-away sandbox, mount it, and walk through a backup and a restore.
    #[command(
        long_about = "Build a throw-away sandbox (two `file` backends, a backup target, three \
sample volumes and a configuration), mount it at DIR/mnt in this process, and walk through a \
backup and a restore made through the mount with ordinary shell commands, each printed before it \
runs. Needs no configuration; runs as root.\n\n\
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
    let cli = Cli::parse();
    match cli.command {
        Command::Mount { mountpoint, config } => {
            // Before any thread exists, so every thread inherits the blocked mask.
            if let Err(e) = daemon::block_stop_signals() {
                eprintln!("backupfs: {e}");
                return ExitCode::FAILURE;
            }
            init_logging("info,fuser=warn");
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            };
            match daemon::serve(config, &mountpoint) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("backupfs: {e}");
                ExitCode::from(2)
            }
        },
        Command::Demo { dir } => {
            // As for `mount`: the walk-through thread must inherit the blocked mask.
            if let Err(e) = daemon::block_stop_signals() {
                eprintln!("backupfs: {e}");
                return ExitCode::FAILURE;
            }
            // The daemon's warnings (refusals) only: its info lines would bury the script.
            init_logging("warn,fuser=error");
            match demo::run(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("backupfs demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Man => {
            let page = clap_mangen::Man::new(Cli::command());
            match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("backupfs: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
