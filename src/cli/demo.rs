//! `backupfs demo`: a throw-away sandbox (two `file` backends, a backup target, three
//! sample volumes), the daemon mounted over it in this process, and a scripted backup and
//! restore made through the mount with the shell commands an operator would type.
//! It never removes anything it did not make, nor a directory that has a mount inside.

use backupfs::config::{Config, ConfigError};
use backupfs::daemon::{self, DaemonError};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Prints a line, ignoring a closed or hung-up terminal: the demo must still clean up
/// after its terminal went away.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// As `say!`, on standard error.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Set to `1` to make the demo stop by itself after the walk-through (it also does when
/// standard input is not a terminal), for scripts and CI.
pub const EXIT_ENV: &str = "BACKUPFS_DEMO_EXIT";

/// The backup target of the sandbox: pool `backups` of backend `hdd`.
const TARGET: &str = "hdd";
const CONFIG_FILE: &str = "backupfs.toml";
const MOUNT_DIR: &str = "mnt";
const SAMPLE_FILES: &str = "sample-files";
/// Everything the demo makes at the top of the sandbox; removal touches only these.
const ENTRIES: [&str; 6] = [CONFIG_FILE, MOUNT_DIR, "ssd", "hdd", "state", SAMPLE_FILES];

const EXT4_VOLUME: &str = "demo-ext4";
const RANDOM_VOLUME: &str = "demo-random";
const SPARSE_VOLUME: &str = "demo-sparse";
const RESTORED_VOLUME: &str = "demo-ext4-restored";

/// The programs the walk-through runs, and the Debian package of each.
const TOOLS: [(&str, &str); 9] = [
    ("sh", "dash"),
    ("mkfs.ext4", "e2fsprogs"),
    ("head", "coreutils"),
    ("truncate", "coreutils"),
    ("dd", "coreutils"),
    ("cp", "coreutils"),
    ("ls", "coreutils"),
    ("cmp", "diffutils"),
    ("getfattr", "attr"),
];

const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// How long to wait, after the daemon stopped, for the walk-through to notice.
const WALK_THROUGH_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo mounts a FUSE filesystem: run it as root")]
    NotRoot,
    #[error("missing programs: {0} (install them and run the demo again)")]
    MissingTools(String),
    #[error("{path} is not an empty directory: give the demo a new or an empty one")]
    NotEmpty { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status})")]
    Command { command: String, status: String },
    #[error("demo configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{0}")]
    WalkThrough(String),
    #[error("backupfs stopped before the walk-through had finished")]
    Interrupted,
    #[error("left {path} in place: {reason}")]
    NotRemoved { path: PathBuf, reason: String },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DemoError {
    let path = path.to_path_buf();
    move |source| DemoError::Io { what, path, source }
}

/// Runs the whole demo: builds the sandbox in `dir` (a new temporary directory when
/// `None`), serves the mount on this thread until a stop signal, walks through a backup
/// and a restore from another thread, then removes what it made.
///
/// Call [`daemon::block_stop_signals`] first, before any thread exists.
pub fn run(dir: Option<PathBuf>) -> Result<(), DemoError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DemoError::NotRoot);
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(tool, package)| format!("{tool} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        return Err(DemoError::MissingTools(missing.join(", ")));
    }
    let sandbox = Sandbox::create(dir)?;
    let outcome = demo_in(&sandbox);
    say!("\nRemoving the sandbox {}", sandbox.root.display());
    let removed = sandbox.remove();
    match (&outcome, &removed) {
        (Ok(()), Ok(())) => say!("Done."),
        // The caller reports the first error; this one would be lost.
        (Err(_), Err(e)) => say_err!("backupfs demo: {e}"),
        _ => {}
    }
    outcome.and(removed)
}

fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let candidate = dir.join(program);
        nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok()
    })
}

/// The sandbox directory, and whether the demo made it (then it goes whole at the end;
/// otherwise only the demo's own entries do).
struct Sandbox {
    root: PathBuf,
    made_root: bool,
}

impl Sandbox {
    fn create(dir: Option<PathBuf>) -> Result<Sandbox, DemoError> {
        let (root, made_root) = match dir {
            None => {
                let template = std::env::temp_dir().join("backupfs-demo.XXXXXX");
                let root = nix::unistd::mkdtemp(&template).map_err(|e| DemoError::Io {
                    what: "create",
                    path: template,
                    source: e.into(),
                })?;
                (root, true)
            }
            Some(dir) => match std::fs::read_dir(&dir) {
                Ok(mut entries) => {
                    if entries.next().is_some() {
                        return Err(DemoError::NotEmpty { path: dir });
                    }
                    (dir, false)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
                    (dir, true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                    return Err(DemoError::NotEmpty { path: dir });
                }
                Err(e) => return Err(io_error("read", &dir)(e)),
            },
        };
        let root = root.canonicalize().map_err(io_error("resolve", &root))?;
        Ok(Sandbox { root, made_root })
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// Removes the demo's entries (and the root if the demo made it), unless something is
    /// still mounted inside: deleting through a mount would delete what it shows.
    fn remove(&self) -> Result<(), DemoError> {
        let mounts = mounts_under(&self.root).map_err(|e| DemoError::NotRemoved {
            path: self.root.clone(),
            reason: format!("cannot read /proc/mounts to check for mounts inside: {e}"),
        })?;
        if !mounts.is_empty() {
            let list: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
            return Err(DemoError::NotRemoved {
                path: self.root.clone(),
                reason: format!(
                    "still mounted inside: {} (umount it, then rm -rf {})",
                    list.join(", "),
                    self.root.display()
                ),
            });
        }
        for entry in ENTRIES {
            let path = self.path(entry);
            let result = match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
            result.map_err(|e| DemoError::NotRemoved {
                path: self.root.clone(),
                reason: format!("cannot remove {}: {e}", path.display()),
            })?;
        }
        if self.made_root {
            std::fs::remove_dir(&self.root).map_err(|e| DemoError::NotRemoved {
                path: self.root.clone(),
                reason: format!("it holds files the demo did not make ({e})"),
            })?;
        }
        Ok(())
    }
}

/// Mount points at or below `dir`, from /proc/mounts.
fn mounts_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let table = std::fs::read_to_string("/proc/mounts")?;
    Ok(table
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .filter(|mountpoint| mountpoint.starts_with(dir))
        .collect())
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs shell commands in the sandbox, printing each one first, as an operator would
/// type it there.
struct Shell {
    dir: PathBuf,
    stopped: Arc<AtomicBool>,
}

impl Shell {
    fn command(&self, line: &str) -> Result<Command, DemoError> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(DemoError::Interrupted);
        }
        say!("$ {line}");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(line)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        Ok(command)
    }

    fn failed(line: &str, status: std::process::ExitStatus) -> DemoError {
        DemoError::Command {
            command: line.to_string(),
            status: status.to_string(),
        }
    }

    /// Runs a command with its output going straight to ours.
    fn run(&self, line: &str) -> Result<(), DemoError> {
        let status = self
            .command(line)?
            .status()
            .map_err(io_error("run", Path::new("sh")))?;
        if !status.success() {
            return Err(Self::failed(line, status));
        }
        Ok(())
    }

    /// Runs a command, shows its output and returns it.
    fn output(&self, line: &str) -> Result<String, DemoError> {
        let output = self
            .command(line)?
            .stderr(Stdio::inherit())
            .output()
            .map_err(io_error("run", Path::new("sh")))?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        {
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(text.as_bytes());
        }
        if !output.status.success() {
            return Err(Self::failed(line, output.status));
        }
        Ok(text)
    }
}

fn section(title: &str, why: &str) {
    say!("\n== {title}");
    if !why.is_empty() {
        say!("   {why}");
    }
}

/// A TOML string holding a path (the sandbox may be anywhere).
fn toml_path(path: &Path) -> Result<String, DemoError> {
    let text = path.to_str().ok_or_else(|| DemoError::Io {
        what: "use",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a configuration path must be UTF-8",
        ),
    })?;
    Ok(toml::Value::String(text.to_string()).to_string())
}

fn config_text(sandbox: &Sandbox) -> Result<String, DemoError> {
    let path = |relative: &str| toml_path(&sandbox.path(relative));
    Ok(format!(
        "# Written by `backupfs demo`; removed with its sandbox.
state_dir = {state}
max_parallel_jobs = 2

[backends.ssd]                      # volumes/ssd/
driver = \"file\"
pools = {{ gold = {gold} }}

[backends.hdd]                      # volumes/hdd/ (pool main only)
driver = \"file\"
pools = {{ main = {main}, backups = {backups} }}

[targets.{TARGET}]                      # backups/{TARGET}/
backend = \"hdd\"
pool = \"backups\"                    # holds backups only
",
        state = path("state")?,
        gold = path("ssd/gold")?,
        main = path("hdd/main")?,
        backups = path("hdd/backups")?,
    ))
}

/// The sample files that go into the ext4 volume.
fn write_sample_files(dir: &Path) -> Result<(), DemoError> {
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).map_err(io_error("create", &docs))?;
    let numbers: String = (1..=10_000).map(|n| format!("{n}\n")).collect();
    let files = [
        (
            dir.join("hello.txt"),
            "Hello from the backupfs demo: this file lives in an ext4 volume.\n".to_string(),
        ),
        (dir.join("numbers.txt"), numbers),
        (
            docs.join("notes.txt"),
            "Look at a backup's files: losetup -r, then mount -o ro.\n".to_string(),
        ),
    ];
    for (path, text) in files {
        std::fs::write(&path, text).map_err(io_error("write", &path))?;
    }
    Ok(())
}

/// Makes the pools, the sample volumes and the configuration, with real commands.
fn build(sandbox: &Sandbox, shell: &Shell) -> Result<PathBuf, DemoError> {
    section(
        "1. The sandbox",
        "Two `file` backends (a volume is the file volume-<id> in a pool directory), \
         a target that keeps backups in a pool of its own, three sample volumes.",
    );
    for dir in [
        "ssd/gold",
        "hdd/main",
        "hdd/backups",
        "state",
        MOUNT_DIR,
        SAMPLE_FILES,
    ] {
        let path = sandbox.path(dir);
        std::fs::create_dir_all(&path).map_err(io_error("create", &path))?;
    }
    write_sample_files(&sandbox.path(SAMPLE_FILES))?;
    say!("(wrote a few files into {SAMPLE_FILES}/)");
    shell.run(&format!(
        "mkfs.ext4 -q -F -d {SAMPLE_FILES} ssd/gold/volume-{EXT4_VOLUME} 64M"
    ))?;
    shell.run(&format!(
        "head -c 64M /dev/urandom > hdd/main/volume-{RANDOM_VOLUME}"
    ))?;
    shell.run(&format!("truncate -s 1G ssd/gold/volume-{SPARSE_VOLUME}"))?;
    for seek in [0, 700] {
        shell.run(&format!(
            "dd if=/dev/urandom of=ssd/gold/volume-{SPARSE_VOLUME} bs=1M seek={seek} count=2 conv=notrunc status=none"
        ))?;
    }
    shell.run("ls -ls ssd/gold hdd/main")?;
    let config_path = sandbox.path(CONFIG_FILE);
    std::fs::write(&config_path, config_text(sandbox)?).map_err(io_error("write", &config_path))?;
    shell.run(&format!("cat {CONFIG_FILE}"))?;
    Ok(config_path)
}

fn demo_in(sandbox: &Sandbox) -> Result<(), DemoError> {
    let root = &sandbox.root;
    say!("backupfs demo in {}", root.display());
    say!(
        "Every command below runs in that directory (cd {}).",
        root.display()
    );
    let stopped = Arc::new(AtomicBool::new(false));
    let shell = Shell {
        dir: root.clone(),
        stopped: stopped.clone(),
    };
    let config_path = build(sandbox, &shell)?;
    let config = Config::load(&config_path)?;
    let auto_exit =
        std::env::var(EXIT_ENV).is_ok_and(|v| v == "1") || !std::io::stdin().is_terminal();

    section(
        "2. The daemon",
        "Served by this process, as `backupfs mount mnt --config backupfs.toml` would.",
    );
    let (done_tx, done_rx) = mpsc::channel();
    let mountpoint = sandbox.path(MOUNT_DIR);
    std::thread::Builder::new()
        .name("demo-walk-through".into())
        .spawn(move || {
            let outcome = walk_through_then_stop(&shell, auto_exit);
            // The receiver is gone only if the demo already ended.
            let _ = done_tx.send(outcome);
        })
        .map_err(io_error("start the walk-through for", root))?;

    let served = daemon::serve(config, &mountpoint);
    stopped.store(true, Ordering::Relaxed);
    let walked = done_rx
        .recv_timeout(WALK_THROUGH_GRACE)
        .unwrap_or(Err(DemoError::Interrupted));
    served?;
    walked
}

/// Waits for the mount, walks through, then stops the daemon when nobody is there to
/// press Ctrl-C (or when the walk-through failed).
fn walk_through_then_stop(shell: &Shell, auto_exit: bool) -> Result<(), DemoError> {
    let outcome = match wait_for_mount(shell).and_then(|()| walk_through(shell)) {
        // A command that failed because the daemon stopped under it (Ctrl-C).
        Err(_) if shell.stopped.load(Ordering::Relaxed) => Err(DemoError::Interrupted),
        other => other,
    };
    match &outcome {
        Ok(()) if auto_exit => {
            say!("\n(no terminal, or {EXIT_ENV}=1: stopping by itself)");
            stop_daemon();
        }
        Ok(()) => say!("\nPress Ctrl-C to stop: backupfs unmounts and the sandbox is removed."),
        // The daemon stopped first: nothing to stop, the demo is already ending.
        Err(DemoError::Interrupted) => {}
        Err(e) => {
            say_err!("\nThe walk-through failed: {e}");
            say_err!("Stopping backupfs and removing the sandbox.");
            stop_daemon();
        }
    }
    outcome
}

/// A SIGTERM to ourselves: `serve` waits for it on the main thread, as for a stop from
/// outside, and unmounts.
fn stop_daemon() {
    // To the process, not this thread (raise): the main thread is the one that waits.
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM);
}

fn wait_for_mount(shell: &Shell) -> Result<(), DemoError> {
    let probe = shell.dir.join(MOUNT_DIR).join("backups");
    let started = Instant::now();
    while !probe.exists() {
        if shell.stopped.load(Ordering::Relaxed) {
            return Err(DemoError::Interrupted);
        }
        if started.elapsed() > MOUNT_TIMEOUT {
            return Err(DemoError::WalkThrough(format!(
                "the mount did not appear at {} within {} s",
                shell.dir.join(MOUNT_DIR).display(),
                MOUNT_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    say!("mounted at {}", shell.dir.join(MOUNT_DIR).display());
    Ok(())
}

/// The backup id behind `by-volume/<volume>/latest.img` (a link to `../../<id>.img`).
fn latest_backup(shell: &Shell, volume_id: &str) -> Result<String, DemoError> {
    let link = shell.output(&format!(
        "readlink mnt/backups/{TARGET}/by-volume/{volume_id}/latest.img"
    ))?;
    link.trim()
        .strip_prefix("../../")
        .and_then(|name| name.strip_suffix(".img"))
        .map(str::to_string)
        .ok_or_else(|| DemoError::WalkThrough(format!("unexpected latest.img link {link:?}")))
}

/// Reads `jobs` until the job has ended, as `watch cat jobs` would show it.
fn wait_for_job(shell: &Shell, backup_id: &str) -> Result<(), DemoError> {
    let jobs = shell.dir.join(format!("{MOUNT_DIR}/backups/{TARGET}/jobs"));
    let started = Instant::now();
    say!("(reading jobs until {backup_id} has ended, as `watch cat jobs` would)");
    loop {
        if shell.stopped.load(Ordering::Relaxed) {
            return Err(DemoError::Interrupted);
        }
        let text = std::fs::read_to_string(&jobs).map_err(io_error("read", &jobs))?;
        let line = text.lines().find(|line| line.starts_with(backup_id));
        match line.and_then(|line| line.split(' ').nth(2)) {
            Some("available") => return Ok(()),
            Some("error") => {
                return Err(DemoError::WalkThrough(format!(
                    "backup {backup_id} failed: {}",
                    line.unwrap_or_default()
                )));
            }
            None => {
                return Err(DemoError::WalkThrough(format!(
                    "backup {backup_id} is not listed in jobs"
                )));
            }
            Some(_) => {}
        }
        if started.elapsed() > JOB_TIMEOUT {
            return Err(DemoError::WalkThrough(format!(
                "backup {backup_id} did not end within {} s",
                JOB_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn walk_through(shell: &Shell) -> Result<(), DemoError> {
    let backups = format!("mnt/backups/{TARGET}");

    section(
        "3. Volumes",
        "Every volume of a backend's pools is a file under volumes/<backend>/.",
    );
    shell.run("ls -l mnt/volumes/ssd mnt/volumes/hdd")?;

    section(
        "4. A backup",
        "One line into the target's request file; `wait` returns when the backup has ended.",
    );
    shell.run(&format!("echo \"{EXT4_VOLUME} wait\" > {backups}/request"))?;
    shell.run(&format!("cat {backups}/jobs"))?;
    say!("(by-volume/<volume>/latest.img links to the volume's newest backup)");
    let backup_id = latest_backup(shell, EXT4_VOLUME)?;
    let image = format!("{backups}/{backup_id}.img");
    shell.run(&format!("ls -l {backups}"))?;
    shell.run(&format!(
        "cmp {image} mnt/volumes/ssd/{EXT4_VOLUME} && echo \"the image and the volume are identical\""
    ))?;

    section(
        "5. A backup in the background",
        "Without `wait` the write returns at once; reading the same open file gives the new backup's id.",
    );
    let sparse_id = shell.output(&format!(
        "exec 3<>{backups}/request; echo \"{SPARSE_VOLUME} name=sparse-demo\" >&3; read -r id <&3; echo \"$id\""
    ))?;
    let sparse_id = sparse_id.trim().to_string();
    if !backupfs::volume::is_valid_id(&sparse_id) {
        return Err(DemoError::WalkThrough(format!(
            "the request file gave {sparse_id:?} instead of a backup id"
        )));
    }
    wait_for_job(shell, &sparse_id)?;
    shell.run(&format!("cat {backups}/jobs"))?;
    say!("(a 1 GiB volume holding 4 MiB: the image's size is 1 GiB, its blocks are few)");
    shell.run(&format!("ls -ls {backups}/{sparse_id}.img"))?;

    section(
        "6. A restore to a new volume",
        "Copying an image into volumes/<backend>/<new-id> creates that volume.",
    );
    shell.run(&format!(
        "cp --sparse=always {image} mnt/volumes/ssd/{RESTORED_VOLUME}"
    ))?;
    shell.run(&format!(
        "cmp {image} mnt/volumes/ssd/{RESTORED_VOLUME} && echo \"the restored volume matches the backup\""
    ))?;
    say!("(the file driver keeps it as a plain sparse file in the pool directory)");
    shell.run(&format!("ls -ls ssd/gold/volume-{RESTORED_VOLUME}"))?;

    section(
        "7. The backup's record",
        "Each scalar field is an extended attribute of the image; the whole record is the .json.",
    );
    shell.run(&format!("getfattr -d {image}"))?;
    shell.run(&format!("cat {backups}/{backup_id}.json"))?;

    print_next_steps(&shell.dir, &backup_id);
    Ok(())
}

/// How the next steps name this program: `backupfs` once it is installed on PATH, else
/// the path of this binary (after `cargo run`, `backupfs` is not a command yet).
fn this_program() -> String {
    if on_path("backupfs") {
        return "backupfs".to_string();
    }
    std::env::current_exe()
        .map(|exe| exe.display().to_string())
        .unwrap_or_else(|_| "backupfs".to_string())
}

fn print_next_steps(root: &Path, backup_id: &str) {
    let backups = format!("mnt/backups/{TARGET}");
    let backupfs = this_program();
    let image = format!("{backups}/{backup_id}.img");
    say!(
        "
== What to try next (in another terminal, as root)
cd {root}
# the progress bar of every job of the target
watch cat {backups}/jobs
{backupfs} status --mount mnt --watch
# incremental backups: only what changed is copied and stored (the first one is full;
# this sandbox is on the machine's disk: without reflinks each one is full, and says so)
echo \"{EXT4_VOLUME} incremental wait\" > {backups}/request
echo \"{EXT4_VOLUME} incremental wait\" > {backups}/request
jq '.parent_id, .changed_bytes, .changes_found_by' {backups}/*.json
# why a request was refused, read back on the same descriptor
exec 3<>{backups}/request; echo no-such-volume >&3 || cat <&3; exec 3>&-
# metrics for Prometheus (node_exporter's textfile collector)
cat mnt/metrics/backupfs.prom
# back up every volume of a backend
for v in $(ls mnt/volumes/ssd); do echo \"$v\" > {backups}/request; done
# look at the files inside a backup (umount before Ctrl-C: the demo removes nothing
# while a mount is inside its sandbox)
loop=$(losetup -r -f --show {image})
mkdir -p look && mount -o ro \"$loop\" look && ls -l look
umount look; losetup -d \"$loop\"
# refusals are errnos: No such file or directory, then Operation not permitted
echo no-such-volume > {backups}/request
rm mnt/volumes/ssd/{EXT4_VOLUME}
# delete a backup
rm {image}",
        root = root.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape_mount_field("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_field("/x\\134y\\011"), "/x\\y\t");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
        assert_eq!(unescape_mount_field("/odd\\9"), "/odd\\9");
    }

    #[test]
    fn the_demo_configuration_is_valid_toml() {
        let sandbox = Sandbox {
            root: PathBuf::from("/tmp/with \"quotes\" and spaces"),
            made_root: false,
        };
        let config = Config::parse(&config_text(&sandbox).unwrap()).unwrap();
        assert_eq!(config.backends.len(), 2);
        assert!(config.is_target_pool("hdd", "backups"));
        assert_eq!(
            config.backends["ssd"].pools()["gold"],
            sandbox.path("ssd/gold")
        );
    }
}
