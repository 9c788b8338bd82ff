//! The thin binary: parses the command line and calls into the library.

use backupfs::config::{self, Config};
use backupfs::daemon;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "backupfs",
    version,
    about = "Any Cinder volume backend as backup storage, served as a filesystem",
    long_about = "backupfs mounts a tree where `echo <volume-id> > backups/<target>/request` starts an \
attach-and-copy backup, every backup is a raw image `backups/<target>/<id>.img`, and a restore is \
copying an image onto `volumes/<backend>/<volume-id>`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount the tree and serve it in the foreground until SIGTERM, SIGINT or umount.
    Mount {
        /// Where to mount (an existing empty directory).
        mountpoint: PathBuf,
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check a configuration without mounting; names the offending key on error.
    CheckConfig {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKUPFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=warn"));
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
            init_logging();
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
    }
}
