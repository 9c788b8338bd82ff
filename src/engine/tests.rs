use super::*;

#[test]
fn a_backupfs_mount_is_found_in_mountinfo_with_its_escapes() {
    let mounts = "\
36 25 0:32 / /mnt/a\\040b rw,nosuid - fuse backupfs rw,user_id=0\n\
39 25 0:34 / /mnt/e rw,nosuid - fuse.backupfs backupfs rw,user_id=0\n\
37 25 0:33 / /mnt/c rw - fuse.sshfs host: rw\n\
38 25 8:1 / /mnt/d rw shared:1 - ext4 /dev/sda1 rw\n";
    assert!(is_backupfs_mount(mounts, "/mnt/a b"));
    assert!(is_backupfs_mount(mounts, "/mnt/e"));
    assert!(!is_backupfs_mount(mounts, "/mnt/c"));
    assert!(!is_backupfs_mount(mounts, "/mnt/d"));
    assert!(!is_backupfs_mount(mounts, "/mnt/a\\040b"));
    assert_eq!(unescape_octal("a\\011b\\134"), "a\tb\\");
    assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
}

#[test]
fn the_state_lock_is_never_taken_through_a_link_or_on_a_fifo() {
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let config = crate::config::Config::parse(&format!("state_dir = {:?}\n", state)).unwrap();
    let victim = scratch.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::os::unix::fs::symlink(&victim, state.join("backupfs.lock")).unwrap();
    assert!(super::state_lock::take_state_lock(&config).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    std::fs::remove_file(state.join("backupfs.lock")).unwrap();
    nix::unistd::mkfifo(&state.join("backupfs.lock"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    assert!(super::state_lock::take_state_lock(&config).is_err());
    std::fs::remove_file(state.join("backupfs.lock")).unwrap();
    assert!(super::state_lock::take_state_lock(&config).is_ok());
}
