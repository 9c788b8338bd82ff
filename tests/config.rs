//! `backupfs check-config` against real directories: every refusal names its key.

mod common;

use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// `backupfs check-config`: whether it passed, and its standard error. A refusal must
/// exit with status 2, as `backupfs mount` does for the same configuration.
#[track_caller]
fn check(config: &Path) -> (bool, String) {
    let out = timed(Duration::from_secs(60), BIN)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(2), "check-config: {stderr}");
    }
    (out.status.success(), stderr)
}

/// Backend `a` with pools as given, backend `b` with pool `vol`, and a target `t` on `tpool`
/// of backend `tbackend`.
fn config(sb: &Sandbox, a_pools: &str, b_pool: &Path, target: &str) -> std::path::PathBuf {
    sb.write_config(&format!(
        "state_dir = \"{}\"\n[backends.a]\ndriver = \"file\"\npools = {{ {a_pools} }}\n\
         [backends.b]\ndriver = \"file\"\npools = {{ vol = \"{}\" }}\n{target}",
        sb.path("state").display(),
        b_pool.display()
    ))
}

#[test]
fn a_good_configuration_passes() {
    let sb = Sandbox::new("cfg-good");
    let (vols, backups, other) = (sb.mkdir("vols"), sb.mkdir("backups"), sb.mkdir("other"));
    let cfg = config(
        &sb,
        &format!(
            "main = \"{}\", backups = \"{}\"",
            vols.display(),
            backups.display()
        ),
        &other,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    let (passed, stderr) = check(&cfg);
    assert!(passed, "{stderr}");
}

#[test]
fn unknown_keys_are_named() {
    let sb = Sandbox::new("cfg-unknown");
    let cfg = sb.write_config("max_paralel_jobs = 2\n");
    let (passed, stderr) = check(&cfg);
    assert!(!passed);
    assert!(stderr.contains("max_paralel_jobs"), "{stderr}");
    let cfg = sb.write_config("[backends.a]\ndriver = \"file\"\npools = {}\ncolour = 1\n");
    let (_, stderr) = check(&cfg);
    assert!(stderr.contains("colour"), "{stderr}");
}

#[test]
fn missing_pool_directory_is_named() {
    let sb = Sandbox::new("cfg-missing");
    let other = sb.mkdir("other");
    let cfg = config(
        &sb,
        &format!("main = \"{}\"", sb.path("nope").display()),
        &other,
        "",
    );
    let (passed, stderr) = check(&cfg);
    assert!(!passed);
    assert!(stderr.contains("backends.a.pools.main"), "{stderr}");
}

#[test]
fn check_config_reports_every_error_of_a_configuration_in_one_run() {
    // Issue 23: one error at a time made an operator run it once per mistake.
    let sb = Sandbox::new("cfg-every");
    let other = sb.mkdir("other");
    let cfg = sb.write_config(&format!(
        "max_parallel_jobs = 0\nstate_dir = \"relative\"\n\
         [backends.a]\ndriver = \"file\"\npools = {{ main = \"{}\", spare = \"{}\" }}\n\
         [backends.b]\ndriver = \"file\"\npools = {{ vol = \"{}\" }}\n\
         [targets.t]\nbackend = \"nope\"\npool = \"backups\"\n",
        sb.path("nope").display(),
        sb.path("gone").display(),
        other.display()
    ));
    let (passed, stderr) = check(&cfg);
    assert!(!passed);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("backupfs: "))
        .collect();
    for key in [
        "max_parallel_jobs:",
        "state_dir:",
        "targets.t.backend:",
        "backends.a.pools.main:",
        "backends.a.pools.spare:",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("backupfs: {key}"))),
            "{key} not reported:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), 5, "one line per error:\n{stderr}");
}

#[test]
fn the_shipped_example_configuration_names_every_placeholder_it_needs_edited() {
    // The example's directories do not exist here: each is named, and its first lines
    // say what to edit first.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/backupfs.toml.example");
    let text = std::fs::read_to_string(&example).expect("example");
    assert!(
        text.lines().take(6).any(|l| l.contains("Edit first")),
        "the example does not say what to edit first"
    );
    let (passed, stderr) = check(&example);
    assert!(!passed, "the example's placeholders exist on this machine?");
    for key in [
        "backends.hdd.pools.backups",
        "backends.hdd.pools.main",
        "backends.ssd.pools.gold",
        "backends.ceph.",
    ] {
        assert!(stderr.contains(key), "{key} not named:\n{stderr}");
    }
}

#[test]
fn target_on_a_pool_it_does_not_name_is_refused() {
    let sb = Sandbox::new("cfg-nopool");
    let (vols, other) = (sb.mkdir("vols"), sb.mkdir("other"));
    let cfg = config(
        &sb,
        &format!("main = \"{}\"", vols.display()),
        &other,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    let (passed, stderr) = check(&cfg);
    assert!(!passed);
    assert!(stderr.contains("targets.t.pool"), "{stderr}");
    let cfg = config(
        &sb,
        &format!("main = \"{}\"", vols.display()),
        &other,
        "[targets.t]\nbackend = \"zz\"\npool = \"main\"\n",
    );
    let (_, stderr) = check(&cfg);
    assert!(stderr.contains("targets.t.backend"), "{stderr}");
}

#[test]
fn target_sharing_a_directory_with_a_volume_pool_is_refused_naming_both() {
    let sb = Sandbox::new("cfg-same");
    let (shared, vols) = (sb.mkdir("shared"), sb.mkdir("vols"));
    // Backend b serves volumes from the very directory a's backup pool names.
    let cfg = config(
        &sb,
        &format!(
            "main = \"{}\", backups = \"{}\"",
            vols.display(),
            shared.display()
        ),
        &shared,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    let (passed, stderr) = check(&cfg);
    assert!(!passed);
    assert!(stderr.contains("backends.a.pools.backups"), "{stderr}");
    assert!(stderr.contains("backends.b.pools.vol"), "{stderr}");
}

#[test]
fn nested_and_symlinked_pools_are_refused() {
    let sb = Sandbox::new("cfg-nested");
    let vols = sb.mkdir("vols");
    let inside = sb.mkdir("vols/inside");
    let other = sb.mkdir("other");
    // Backups inside a volume pool.
    let cfg = config(
        &sb,
        &format!(
            "main = \"{}\", backups = \"{}\"",
            vols.display(),
            inside.display()
        ),
        &other,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    let (passed, stderr) = check(&cfg);
    assert!(!passed, "backups nested in a volume pool");
    assert!(stderr.contains("backends.a.pools.main"), "{stderr}");
    // A volume pool inside the backup pool.
    let cfg = config(
        &sb,
        &format!(
            "main = \"{}\", backups = \"{}\"",
            inside.display(),
            vols.display()
        ),
        &other,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    assert!(!check(&cfg).0, "a volume pool nested in the backup pool");
    // A symlink to a volume pool.
    let link = sb.path("link");
    std::os::unix::fs::symlink(&other, &link).unwrap();
    let cfg = config(
        &sb,
        &format!(
            "main = \"{}\", backups = \"{}\"",
            vols.display(),
            link.display()
        ),
        &other,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    let (passed, stderr) = check(&cfg);
    assert!(!passed, "a symlink to b's volume pool");
    assert!(stderr.contains("backends.b.pools.vol"), "{stderr}");
}

#[test]
fn a_volume_pool_inside_a_claimed_target_pool_is_refused_for_the_overlap() {
    let mut sb = Sandbox::new("cfg-inside-claimed");
    let (vols, backups, other) = (sb.mkdir("vols"), sb.mkdir("backups"), sb.mkdir("other"));
    let target = "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n";
    let pools = |main: &Path| {
        format!(
            "main = \"{}\", backups = \"{}\"",
            main.display(),
            backups.display()
        )
    };
    // A first start claims the target's pool: from then on its contents are not what
    // check-config looks at (a claimed pool is the target's, whatever it holds), so
    // only the containment rule can refuse what follows.
    let cfg = config(&sb, &pools(&vols), &other, target);
    assert!(check(&cfg).0, "the claimable layout passes");
    sb.start_daemon(&cfg).stop_clean();
    let inside = sb.mkdir("backups/inside");
    let cfg = config(&sb, &pools(&inside), &other, target);
    let (passed, stderr) = check(&cfg);
    assert!(!passed, "a volume pool inside the claimed target pool");
    assert!(stderr.contains("targets.t"), "{stderr}");
    assert!(stderr.contains("overlaps the volume pool"), "{stderr}");
    assert!(stderr.contains("backends.a.pools.main"), "{stderr}");
    assert!(
        !stderr.contains("not empty"),
        "not the claim check: {stderr}"
    );
}

#[test]
fn an_admin_group_that_does_not_exist_is_refused_naming_the_key() {
    let sb = Sandbox::new("cfg-no-group");
    let (vols, backups, other) = (sb.mkdir("vols"), sb.mkdir("backups"), sb.mkdir("other"));
    let pools = format!(
        "main = \"{}\", backups = \"{}\"",
        vols.display(),
        backups.display()
    );
    let target = "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n";
    let text = std::fs::read_to_string(config(&sb, &pools, &other, target)).unwrap();
    // A group name no system has (groupadd refuses names this long).
    let missing = "bfs-no-such-group-27-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";
    let cfg = sb.write_config(&text.replacen(
        "state_dir",
        &format!("admin_group = \"{missing}\"\nstate_dir"),
        1,
    ));
    let (passed, stderr) = check(&cfg);
    assert!(!passed, "an admin_group that does not exist");
    assert!(stderr.contains("admin_group"), "{stderr}");
    assert!(stderr.contains(missing), "{stderr}");
    // The same with a group that exists passes.
    let cfg = sb.write_config(&text.replacen("state_dir", "admin_group = \"root\"\nstate_dir", 1));
    let (passed, stderr) = check(&cfg);
    assert!(passed, "{stderr}");
}

#[test]
fn bind_mount_of_a_volume_pool_is_the_same_storage() {
    let mut sb = Sandbox::new("cfg-bind");
    let vols = sb.mkdir("vols");
    let other = sb.mkdir("other");
    let bind = sb.mkdir("bind");
    sb.bind(&other, &bind);
    let cfg = config(
        &sb,
        &format!(
            "main = \"{}\", backups = \"{}\"",
            vols.display(),
            bind.display()
        ),
        &other,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    let (passed, stderr) = check(&cfg);
    sb.umount(&bind);
    assert!(!passed, "a bind mount of b's volume pool");
    assert!(stderr.contains("backends.b.pools.vol"), "{stderr}");
}

#[test]
fn two_targets_on_one_pool_are_refused() {
    let sb = Sandbox::new("cfg-two");
    let (vols, backups, other) = (sb.mkdir("vols"), sb.mkdir("backups"), sb.mkdir("other"));
    let cfg = config(
        &sb,
        &format!(
            "main = \"{}\", backups = \"{}\"",
            vols.display(),
            backups.display()
        ),
        &other,
        "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n[targets.u]\nbackend = \"a\"\npool = \"backups\"\n",
    );
    let (passed, stderr) = check(&cfg);
    assert!(!passed);
    assert!(stderr.contains("targets.u"), "{stderr}");
}

/// `backupfs mount` in the foreground: its exit code and standard error.
fn mount(config: &Path, mountpoint: &Path) -> (Option<i32>, String) {
    let out = timed(Duration::from_secs(60), BIN)
        .arg("mount")
        .arg(mountpoint)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn mount_with_a_bad_configuration_exits_2_naming_the_key_and_mounts_nothing() {
    let sb = Sandbox::new("cfg-mount");
    let (vols, backups, other) = (sb.mkdir("vols"), sb.mkdir("backups"), sb.mkdir("other"));
    let mnt = sb.mkdir("mnt");
    let good = format!(
        "main = \"{}\", backups = \"{}\"",
        vols.display(),
        backups.display()
    );
    let target = "[targets.t]\nbackend = \"a\"\npool = \"backups\"\n";
    // Each configuration is written over the one before it: keep each in its own file.
    let kept = std::cell::Cell::new(0);
    let keep = |cfg: std::path::PathBuf| {
        kept.set(kept.get() + 1);
        let own = sb.path(&format!("case-{}.toml", kept.get()));
        std::fs::copy(&cfg, &own).unwrap();
        own
    };
    let cases = [
        (
            "max_paralel_jobs",
            keep(sb.write_config("max_paralel_jobs = 2\n")),
        ),
        (
            "backends.a.pools.main",
            keep(config(
                &sb,
                &format!("main = \"{}\"", sb.path("nope").display()),
                &other,
                "",
            )),
        ),
        (
            "backends.b.pools.vol",
            keep(config(
                &sb,
                &format!(
                    "main = \"{}\", backups = \"{}\"",
                    vols.display(),
                    other.display()
                ),
                &other,
                target,
            )),
        ),
        (
            "targets.t.pool",
            keep(config(
                &sb,
                &format!("main = \"{}\"", vols.display()),
                &other,
                target,
            )),
        ),
        ("max_parallel_jobs", {
            let path = config(&sb, &good, &other, target);
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, format!("max_parallel_jobs = 0\n{text}")).unwrap();
            keep(path)
        }),
        ("", keep(sb.write_config("this is not toml [\n"))),
    ];
    for (key, cfg) in cases {
        let text = std::fs::read_to_string(&cfg).unwrap();
        let (code, stderr) = mount(&cfg, &mnt);
        assert_eq!(code, Some(2), "{text}\n{stderr}");
        assert!(stderr.contains(key), "{key} is named: {stderr}");
        assert!(!is_fuse_mount(&mnt), "nothing is mounted");
    }
    // No configuration file at all is a configuration error too.
    let (code, stderr) = mount(&sb.path("missing.toml"), &mnt);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");
    // A good configuration that cannot be mounted is another failure: 1.
    let cfg = config(&sb, &good, &other, target);
    let (code, stderr) = mount(&cfg, &sb.path("no-such-mountpoint"));
    assert_eq!(code, Some(1), "{stderr}");
}
