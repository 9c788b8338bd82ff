//! Shared set-up for the tests: real loop-mounted filesystems, a real daemon on a real
//! mount, real shell tools. Everything made here is undone by Drop, also when a test
//! fails: daemons killed, mounts detached, loop devices freed, directories removed.
#![allow(dead_code)]

pub mod ceph;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_backupfs");

#[derive(Debug, Clone, Copy)]
pub enum Fs {
    Btrfs,
    Xfs,
    Ext4,
}

pub struct Sandbox {
    pub dir: PathBuf,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    children: Vec<Child>,
    daemons: Vec<PathBuf>,
}

/// Runs `bash -c script`; the output whatever the status.
pub fn sh(script: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs")
}

/// Runs a script that must succeed; its stdout.
#[track_caller]
pub fn ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "script failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The errno of one write(2) of `line` to `path` (opened O_WRONLY), None if it succeeded.
pub fn write_errno(path: &Path, line: &[u8]) -> Option<i32> {
    let mut file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) => return e.raw_os_error(),
    };
    // One write(2), exactly as `echo` makes it; a short write would be a failure too.
    match file.write(line) {
        Ok(n) if n == line.len() => None,
        Ok(_) => Some(libc::EIO),
        Err(e) => e.raw_os_error(),
    }
}

pub fn sha256(path: &Path) -> String {
    ok(&format!("sha256sum '{}' | cut -d' ' -f1", path.display()))
        .trim()
        .to_string()
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        let dir = std::env::temp_dir().join(format!(
            "backupfs-test-{name}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ rand_u32() as u128
        ));
        std::fs::create_dir_all(&dir).expect("sandbox dir");
        Sandbox {
            dir,
            mounts: Vec::new(),
            loops: Vec::new(),
            children: Vec::new(),
            daemons: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// A directory of its own (on the machine's disk: ext4 here, no reflinks).
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(&path).expect("mkdir");
        path
    }

    /// A fresh filesystem of `size_mb` on a loop device, mounted at `rel`.
    pub fn loop_fs(&mut self, rel: &str, fs: Fs, size_mb: u64) -> PathBuf {
        let image = self.path(&format!("{rel}.fsimg"));
        let mnt = self.mkdir(rel);
        File::create(&image)
            .and_then(|f| f.set_len(size_mb << 20))
            .expect("fs image");
        let mkfs = match fs {
            Fs::Btrfs => "mkfs.btrfs -q -f",
            Fs::Xfs => "mkfs.xfs -q -f",
            Fs::Ext4 => "mkfs.ext4 -q -F",
        };
        ok(&format!("{mkfs} '{}' >/dev/null 2>&1", image.display()));
        let dev = ok(&format!("losetup -f --show '{}'", image.display()))
            .trim()
            .to_string();
        self.loops.push(dev.clone());
        ok(&format!("mount '{dev}' '{}'", mnt.display()));
        self.mounts.push(mnt.clone());
        mnt
    }

    /// Binds a file to a loop device (a volume "attached" the way a hypervisor would).
    pub fn attach_loop(&mut self, file: &Path) -> String {
        let dev = ok(&format!("losetup -f --show '{}'", file.display()))
            .trim()
            .to_string();
        self.loops.push(dev.clone());
        dev
    }

    pub fn detach_loop(&mut self, dev: &str) {
        ok(&format!("losetup -d {dev}"));
        self.loops.retain(|d| d != dev);
    }

    /// Another process holding an fcntl write lock on `file` (as QEMU does).
    pub fn hold_lock(&mut self, file: &Path) -> usize {
        let ready = self.path(&format!("lock-ready-{}", self.children.len()));
        let child = Command::new("python3")
            .arg("-c")
            .arg(
                "import fcntl,time,sys\n\
                 f=open(sys.argv[1],'r+b')\n\
                 fcntl.lockf(f, fcntl.LOCK_EX)\n\
                 open(sys.argv[2],'w').close()\n\
                 time.sleep(600)\n",
            )
            .arg(file)
            .arg(&ready)
            .spawn()
            .expect("python3 runs");
        self.children.push(child);
        wait_for(|| ready.exists(), "lock holder to start");
        self.children.len() - 1
    }

    pub fn release(&mut self, child: usize) {
        let _ = self.children[child].kill();
        let _ = self.children[child].wait();
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.path("backupfs.toml");
        std::fs::write(&path, text).expect("config");
        path
    }

    /// Starts `backupfs mount` and waits for the tree to appear.
    pub fn start_daemon(&mut self, config: &Path) -> Daemon {
        self.start_daemon_env(config, &[])
    }

    /// Starts `backupfs mount` with extra environment variables.
    pub fn start_daemon_env(&mut self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mnt = self.path("mnt");
        // A stale mount of a killed daemon answers ENOTCONN here; the daemon clears it.
        let _ = std::fs::create_dir_all(&mnt);
        let log = self.path("daemon.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&log)
            .expect("log");
        let mounted_before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("backupfs mounted")
            .count();
        let child = Command::new(BIN)
            .arg("mount")
            .arg(&mnt)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("backupfs starts");
        self.daemons.push(mnt.clone());
        let daemon = Daemon {
            child,
            mnt: mnt.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // A stale mount is a fuse mount too, and may answer from its caches: wait for this
        // daemon to say it has mounted, and for a listing only a live daemon can give.
        while !(daemon.log().matches("backupfs mounted").count() > mounted_before
            && std::fs::read_dir(mnt.join("backups")).is_ok())
        {
            assert!(
                Instant::now() < deadline,
                "backupfs did not mount; log:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }
}

pub fn is_fuse_mount(path: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split(' ');
            let (_, target, kind) = (f.next(), f.next(), f.next());
            target == Some(path.to_str().unwrap_or(""))
                && kind.is_some_and(|k| k.starts_with("fuse"))
        })
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u32::from_ne_bytes(b)
}

#[track_caller]
pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for mnt in self.daemons.iter().rev() {
            let _ = sh(&format!("umount -l '{}' 2>/dev/null", mnt.display()));
        }
        for mnt in self.mounts.iter().rev() {
            let _ = sh(&format!("umount -l '{}' 2>/dev/null", mnt.display()));
        }
        for dev in self.loops.iter().rev() {
            let _ = sh(&format!("losetup -d {dev} 2>/dev/null"));
        }
        let still_mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .contains(self.dir.to_str().unwrap_or("/"));
        if !still_mounted {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `backupfs mount`; killed (-9) on Drop if still running.
pub struct Daemon {
    pub child: Child,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn target(&self, target: &str) -> PathBuf {
        self.mnt.join("backups").join(target)
    }

    pub fn volume(&self, backend: &str, volume_id: &str) -> PathBuf {
        self.mnt.join("volumes").join(backend).join(volume_id)
    }

    /// `echo "<line>" > request`, returning the errno of the write if it failed.
    pub fn request(&self, target: &str, line: &str) -> Option<i32> {
        write_errno(
            &self.target(target).join("request"),
            format!("{line}\n").as_bytes(),
        )
    }

    /// Starts a backup and returns its id, read back through the same open file.
    #[track_caller]
    pub fn backup(&self, target: &str, line: &str) -> String {
        let request = self.target(target).join("request");
        ok(&format!(
            "exec 3<>'{}'; echo '{line}' >&3; read -r id <&3; echo \"$id\"",
            request.display()
        ))
        .trim()
        .to_string()
    }

    pub fn jobs(&self, target: &str) -> String {
        std::fs::read_to_string(self.target(target).join("jobs")).unwrap_or_default()
    }

    pub fn record(&self, target: &str, backup_id: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.target(target).join(format!("{backup_id}.json")))
            .expect("record readable");
        serde_json::from_str(&text).expect("record is JSON")
    }

    pub fn image(&self, target: &str, backup_id: &str) -> PathBuf {
        self.target(target).join(format!("{backup_id}.img"))
    }

    /// Waits until the job has ended; its state.
    #[track_caller]
    pub fn wait_job(&self, target: &str, backup_id: &str) -> String {
        let mut state = String::new();
        wait_for(
            || {
                state = self
                    .jobs(target)
                    .lines()
                    .find(|l| l.starts_with(backup_id))
                    .and_then(|l| l.split(' ').nth(2))
                    .unwrap_or("")
                    .to_string();
                state == "available" || state == "error"
            },
            "the job to end",
        );
        state
    }

    /// SIGTERM, then wait for the process to exit; its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit()
    }

    /// kill -9 and leave the mount as a dead daemon leaves it (the sandbox detaches it).
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = sh(&format!("umount -l '{}' 2>/dev/null", self.mnt.display()));
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = sh(&format!("umount -l '{}' 2>/dev/null", self.mnt.display()));
    }
}

/// A standard layout: backend `ssd` (pool `gold` on `ssd_fs`), backend `hdd` (pool `main`
/// for volumes and pool `backups` for the target `hdd`, both on `hdd_fs`).
pub struct Layout {
    pub gold: PathBuf,
    pub main: PathBuf,
    pub backups: PathBuf,
    pub config: PathBuf,
}

pub fn layout(sb: &mut Sandbox, ssd_fs: Option<Fs>, hdd_fs: Option<Fs>, extra: &str) -> Layout {
    let ssd = match ssd_fs {
        Some(fs) => sb.loop_fs("ssd", fs, 512),
        None => sb.mkdir("ssd"),
    };
    let hdd = match hdd_fs {
        Some(fs) => sb.loop_fs("hdd", fs, 1024),
        None => sb.mkdir("hdd"),
    };
    let gold = ssd.join("gold");
    let main = hdd.join("main");
    let backups = hdd.join("backups");
    for d in [&gold, &main, &backups] {
        std::fs::create_dir_all(d).expect("pool dir");
    }
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n{extra}\n\
         [backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ main = \"{}\", backups = \"{}\" }}\n\
         [targets.hdd]\nbackend = \"hdd\"\npool = \"backups\"\n",
        state.display(),
        gold.display(),
        main.display(),
        backups.display()
    ));
    Layout {
        gold,
        main,
        backups,
        config,
    }
}

/// Writes `mb` MiB of random data as a volume file.
pub fn random_volume(pool: &Path, volume_id: &str, mb: u64) -> PathBuf {
    let path = pool.join(format!("volume-{volume_id}"));
    ok(&format!(
        "head -c {mb}M /dev/urandom > '{}'",
        path.display()
    ));
    path
}

/// A sparse volume of `size_mb` MiB with `data_mb` MiB of random data at `at_mb` MiB.
pub fn sparse_volume(
    pool: &Path,
    volume_id: &str,
    size_mb: u64,
    at_mb: u64,
    data_mb: u64,
) -> PathBuf {
    let path = pool.join(format!("volume-{volume_id}"));
    ok(&format!(
        "truncate -s {size_mb}M '{p}' && dd if=/dev/urandom of='{p}' bs=1M seek={at_mb} count={data_mb} conv=notrunc status=none",
        p = path.display()
    ));
    path
}

/// Backend `ssd` (pool `gold` on the machine's disk) and a target `target` on a small ext4
/// loop filesystem of `size_mb` MiB, where ENOSPC is easy to reach. Returns the `gold`
/// and backup pool directories and the configuration.
pub fn small_target(sb: &mut Sandbox, target: &str, size_mb: u64) -> (PathBuf, PathBuf, PathBuf) {
    let hdd = sb.loop_fs("hdd", Fs::Ext4, size_mb);
    let gold = sb.mkdir("ssd");
    let backups = hdd.join("backups");
    std::fs::create_dir_all(&backups).expect("pool dir");
    let state = sb.mkdir("state");
    let config = sb.write_config(&format!(
        "state_dir = \"{}\"\n[backends.ssd]\ndriver = \"file\"\npools = {{ gold = \"{}\" }}\n\
         [backends.hdd]\ndriver = \"file\"\npools = {{ backups = \"{}\" }}\n\
         [targets.{target}]\nbackend = \"hdd\"\npool = \"backups\"\n",
        state.display(),
        gold.display(),
        backups.display()
    ));
    (gold, backups, config)
}
