//! Who may do what through the mount: root does everything; with `allow_other` the
//! `admin_group` reads images, records and jobs; nobody else reads anything; nobody but
//! root writes `request`, writes volumes or deletes backups.

mod common;

use common::*;

/// A group and two users made for one test, removed on Drop.
struct Accounts {
    group: String,
    admin: String,
    other: String,
}

impl Accounts {
    fn new(tag: &str) -> Accounts {
        let n = std::process::id() % 100_000;
        let accounts = Accounts {
            group: format!("bfsg{tag}{n}"),
            admin: format!("bfsa{tag}{n}"),
            other: format!("bfso{tag}{n}"),
        };
        // useradd takes a lock on /etc/passwd; parallel tests may meet there.
        let retry = |cmd: String| {
            ok(&format!(
                "for i in 1 2 3 4 5 6 7 8 9 10; do {cmd} && exit 0; sleep 0.3; done; exit 1"
            ))
        };
        retry(format!("groupadd {}", accounts.group));
        retry(format!(
            "useradd -M -N -s /bin/sh -G {} {}",
            accounts.group, accounts.admin
        ));
        retry(format!("useradd -M -N -s /bin/sh {}", accounts.other));
        accounts
    }

    /// Runs a script as `user`; true if it succeeded.
    fn as_user(&self, user: &str, script: &str) -> bool {
        sh(&format!(
            "runuser -u {user} -- sh -c \"{script}\" 2>/dev/null"
        ))
        .status
        .success()
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        let _ = sh(&format!("userdel {} 2>/dev/null", self.admin));
        let _ = sh(&format!("userdel {} 2>/dev/null", self.other));
        let _ = sh(&format!("groupdel {} 2>/dev/null", self.group));
    }
}

#[test]
fn admin_group_reads_and_nobody_else_writes_or_reads() {
    let accounts = Accounts::new("p");
    let mut sb = Sandbox::new("perms");
    // Other users must be able to reach the mountpoint itself.
    ok(&format!("chmod 755 '{}'", sb.dir.display()));
    let l = layout(
        &mut sb,
        None,
        Some(Fs::Btrfs),
        &format!("allow_other = true\nadmin_group = \"{}\"", accounts.group),
    );
    random_volume(&l.gold, "v", 2);
    let d = sb.start_daemon(&l.config);
    let id = d.backup("hdd", "v wait");
    let t = d.target("hdd").display().to_string();
    let img = d.image("hdd", &id).display().to_string();
    let vol = d.volume("ssd", "v").display().to_string();
    let (admin, other) = (accounts.admin.as_str(), accounts.other.as_str());

    assert_eq!(ok(&format!("stat -c %a '{img}'")).trim(), "440");
    assert!(accounts.as_user(admin, &format!("cat '{img}' > /dev/null")));
    assert!(accounts.as_user(admin, &format!("cat '{t}/{id}.json' > /dev/null")));
    assert!(accounts.as_user(admin, &format!("cat '{t}/jobs' | grep -q {id}")));
    assert!(accounts.as_user(admin, &format!("ls '{t}' > /dev/null")));
    assert!(accounts.as_user(admin, &format!("getfattr -d '{img}' > /dev/null")));

    for user in [admin, other] {
        assert!(
            !accounts.as_user(user, &format!("echo v > '{t}/request'")),
            "{user} requested"
        );
        assert!(
            !accounts.as_user(user, &format!("echo {id} > '{t}/verify'")),
            "{user} verified"
        );
        assert!(
            !accounts.as_user(user, &format!("printf x > '{vol}'")),
            "{user} wrote a volume"
        );
        assert!(
            !accounts.as_user(user, &format!("cat '{vol}' > /dev/null")),
            "{user} read a volume"
        );
        assert!(
            !accounts.as_user(user, &format!("rm -f '{img}'")),
            "{user} deleted a backup"
        );
        assert!(
            !accounts.as_user(
                user,
                &format!("touch '{}/ssd/new'", d.mnt.join("volumes").display())
            ),
            "{user} created a volume"
        );
    }
    for what in [img.clone(), format!("{t}/{id}.json"), format!("{t}/jobs")] {
        assert!(
            !accounts.as_user(other, &format!("cat '{what}' > /dev/null")),
            "other read {what}"
        );
    }
    assert!(!accounts.as_user(other, &format!("ls '{t}' > /dev/null")));
    assert!(d.image("hdd", &id).exists(), "the backup is still there");
    assert!(!l.gold.join("volume-new").exists());
}

#[test]
fn without_allow_other_only_root_enters_the_mount() {
    let accounts = Accounts::new("q");
    let mut sb = Sandbox::new("owner");
    ok(&format!("chmod 755 '{}'", sb.dir.display()));
    let l = layout(&mut sb, None, Some(Fs::Btrfs), "");
    let d = sb.start_daemon(&l.config);
    assert!(!accounts.as_user(
        &accounts.admin,
        &format!("ls '{}' > /dev/null", d.mnt.display())
    ));
    assert!(ok(&format!("ls '{}'", d.mnt.display())).contains("backups"));
}
