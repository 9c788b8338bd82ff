//! The configuration parser must turn any text into a config or an error, never a panic.
#![no_main]

use backupfs::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text);
    }
});
