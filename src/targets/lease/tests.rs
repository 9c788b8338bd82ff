use super::*;
use crate::targets::store::MemStore;

const LEASE: Duration = Duration::from_millis(300);

fn store() -> Arc<dyn ObjectStore> {
    Arc::new(MemStore::default())
}

#[test]
fn a_node_name_is_served_by_one_live_daemon() {
    let store = store();
    let a = Coordinator::join(store.clone(), "a", LEASE).unwrap();
    // Another daemon of this very process counts as alive here: refused after the wait
    // for a stopping one would be too long for a test, so a different holder is faked.
    let b = Coordinator::join(store.clone(), "b", LEASE).unwrap();
    assert_eq!(a.node(), "a");
    assert_eq!(b.node(), "b");
    // A heartbeat of a process of this boot that is gone is taken over at once.
    let dead = Beat {
        node: "c".into(),
        holder: format!("{}.{}.1.x", boot_id(), u32::MAX - 1),
        backup_id: None,
        parent: None,
        beat: 7,
    };
    store.put("backupfs.node.c", &encode(&dead)).unwrap();
    let started = Instant::now();
    Coordinator::join(store.clone(), "c", LEASE).unwrap();
    assert!(started.elapsed() < LEASE);
    // One from another machine that beats is alive: refused.
    let elsewhere = Beat {
        holder: "other-boot.1.1.x".into(),
        ..dead.clone()
    };
    store.put("backupfs.node.d", &encode(&elsewhere)).unwrap();
    let beating = {
        let store = store.clone();
        let elsewhere = elsewhere.clone();
        std::thread::spawn(move || {
            for beat in 0..20 {
                let b = Beat {
                    beat,
                    ..elsewhere.clone()
                };
                store.put("backupfs.node.d", &encode(&b)).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    assert!(matches!(
        Coordinator::join(store.clone(), "d", LEASE),
        Err(LeaseError::NodeTaken { .. })
    ));
    beating.join().unwrap();
    // Once it stops beating for a lease, it is taken over.
    Coordinator::join(store.clone(), "d", LEASE).unwrap();
}

#[test]
fn a_renewal_that_found_a_claim_before_its_release_does_not_write_it_back() {
    let store = store();
    let a = Coordinator::join(store.clone(), "a", LEASE).unwrap();
    let claim = a.claim("files", "v1", "b1").unwrap();
    // The nodes' round copied the claims, then the backup ended and let go of its claim,
    // then the round wrote the claims it had copied.
    a.release(&claim);
    assert!(store.get(&claim.object, CAP).unwrap().is_none());
    a.renew_claim(&claim).unwrap();
    assert!(
        store.get(&claim.object, CAP).unwrap().is_none(),
        "a released claim was written back"
    );
    // The next backup of the volume, on this node or another, is not refused.
    let next = a.claim("files", "v1", "b2").unwrap();
    a.release(&next);
}

#[test]
fn one_claim_per_volume_across_nodes_and_a_lapsed_one_is_taken_over_once() {
    let store = store();
    let a = Coordinator::join(store.clone(), "a", LEASE).unwrap();
    let b = Coordinator::join(store.clone(), "b", LEASE).unwrap();
    let c = Coordinator::join(store.clone(), "c", LEASE).unwrap();
    let claim = a.claim("files", "v1", "b1").unwrap();
    let busy = b.claim("files", "v1", "b2").err().unwrap().to_string();
    assert!(busy.contains("node a") && busy.contains("b1"), "{busy}");
    a.set_parent(&claim, Some("p0")).unwrap();
    assert!(b.parents_in_use().unwrap().contains("p0"));
    // While a renews, nobody finds it stale.
    for _ in 0..6 {
        assert!(a.renew().is_empty());
        assert!(b.stale().unwrap().is_empty());
        assert!(c.stale().unwrap().is_empty());
        std::thread::sleep(LEASE / 4);
    }
    // a stops renewing (killed, paused): after a lease, b and c find it stale; one of
    // them takes it over.
    b.stale().unwrap();
    c.stale().unwrap();
    std::thread::sleep(LEASE + LEASE / 5);
    let stale_b = b.stale().unwrap();
    let stale_c = c.stale().unwrap();
    assert_eq!(stale_b.len(), 1);
    assert_eq!(stale_c.len(), 1);
    let won_b = b.take_over(&stale_b[0]);
    let won_c = c.take_over(&stale_c[0]);
    assert!(won_b != won_c, "exactly one takes over");
    // a, resumed, is fenced: it may not decide, and its renewal marks the claim lost.
    assert!(!claim.valid(LEASE));
    assert!(!a.decide(&claim, "available").unwrap());
    assert!(claim.is_lost());
    a.release(&claim);
    assert!(
        store.get(&claim.object, CAP).unwrap().is_some(),
        "left to the taker"
    );
    let (taker, stale) = if won_b {
        (&b, &stale_b[0])
    } else {
        (&c, &stale_c[0])
    };
    taker.forget(stale);
    assert!(b.claim("files", "v1", "b3").is_ok());
}

#[test]
fn a_holder_that_decides_first_keeps_its_backup() {
    let store = store();
    let a = Coordinator::join(store.clone(), "a", LEASE).unwrap();
    let b = Coordinator::join(store.clone(), "b", LEASE).unwrap();
    let claim = a.claim("files", "v1", "b1").unwrap();
    assert!(a.decide(&claim, "available").unwrap());
    // b finds the claim stale later (a died right after deciding): it may clean up the
    // claim, but the decision stays a's.
    b.stale().unwrap();
    std::thread::sleep(LEASE + LEASE / 5);
    let stale = b.stale().unwrap();
    assert!(b.take_over(&stale[0]));
    let end: End =
        serde_json::from_slice(&store.get("backupfs.end.b1", CAP).unwrap().unwrap()).unwrap();
    assert_eq!(end.outcome, "available");
}

#[test]
fn a_record_is_changed_by_one_node_at_a_time() {
    let store = store();
    let a = Coordinator::join(store.clone(), "a", LEASE).unwrap();
    let b = Coordinator::join(store.clone(), "b", LEASE).unwrap();
    let held = a.lock_record("r1").unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let waited = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let started = Instant::now();
            let _lock = b.lock_record("r1").unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            counter.load(Ordering::SeqCst),
            0,
            "b waits while a holds it"
        );
        drop(held);
        waiter.join().unwrap()
    });
    assert!(waited >= Duration::from_millis(100));
    // Another record is not held up, and a lock left by a holder that stopped is
    // broken after a lease.
    let _other = b.lock_record("r2").unwrap();
    let elsewhere = Beat {
        node: "x".into(),
        holder: "other-boot.1.1.x".into(),
        backup_id: Some("r3".into()),
        parent: None,
        beat: 1,
    };
    store.put("backupfs.lock.r3", &encode(&elsewhere)).unwrap();
    let started = Instant::now();
    let _r3 = b.lock_record("r3").unwrap();
    assert!(started.elapsed() >= LEASE);
}

#[test]
fn node_names_are_host_names() {
    assert!(valid_node("cinder-backup-1.example"));
    for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
        assert!(!valid_node(bad), "{bad:?}");
    }
    assert!(is_coordination("backupfs.claim.files.v1"));
    assert!(is_coordination(".backupfs.node.a.1234.tmp"));
    assert!(!is_coordination("backup-x.json"));
    // An RBD target's lock object of earlier versions is not a record lock.
    assert!(!is_coordination("backupfs.lock"));
    assert!(is_coordination("backupfs.lock.backupfs-series-x"));
}

#[test]
fn a_renewed_record_lock_changes_and_one_broken_meanwhile_is_left_to_its_new_holder() {
    let store = store();
    let a = Coordinator::join(store.clone(), "a", LEASE).unwrap();
    let held = a.lock_record("backupfs-series-x").unwrap();
    let before = store.get("backupfs.lock.backupfs-series-x", CAP).unwrap();
    assert!(held.renew());
    let after = store.get("backupfs.lock.backupfs-series-x", CAP).unwrap();
    assert_ne!(
        before, after,
        "a renewal changes the object: nobody finds it stale"
    );
    // Broken as stale and taken by another node meanwhile: no longer renewed, not removed.
    store
        .put("backupfs.lock.backupfs-series-x", b"{\"other\":1}\n")
        .unwrap();
    assert!(!held.renew());
    drop(held);
    assert_eq!(
        store
            .get("backupfs.lock.backupfs-series-x", CAP)
            .unwrap()
            .as_deref(),
        Some(&b"{\"other\":1}\n"[..])
    );
}
