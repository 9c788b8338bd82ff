//! The request grammar must refuse or accept any bytes without panicking, and what it
//! accepts must name a volume ID that can never become a path outside a pool.
#![no_main]

use backupfs::engine::request::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = parse(data) {
        assert!(backupfs::volume::is_valid_id(&request.volume_id));
        assert!(!request.volume_id.contains('/'));
        assert!(request.name.as_ref().is_none_or(|n| !n.is_empty() && !n.contains(' ')));
    }
});
