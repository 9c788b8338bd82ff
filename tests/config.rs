//! `backupfs check-config` against real directories: every refusal names its key.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn check(config: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
fn bind_mount_of_a_volume_pool_is_the_same_storage() {
    let mut sb = Sandbox::new("cfg-bind");
    let vols = sb.mkdir("vols");
    let other = sb.mkdir("other");
    let bind = sb.mkdir("bind");
    ok(&format!(
        "mount --bind '{}' '{}'",
        other.display(),
        bind.display()
    ));
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
    ok(&format!("umount '{}'", bind.display()));
    let _ = &mut sb;
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
