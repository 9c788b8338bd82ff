//! Calls librbd makes back into Rust (diff extents, copy progress): the closure's state
//! behind a C pointer. A panic must never unwind into C: it is kept and resumed once
//! librbd has returned.

use super::image::Extent;
use super::{Result, check};
use parking_lot::Mutex;
use std::ffi::{c_int, c_void};
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, Ordering};

/// The shared state of a callback called from inside librbd.
pub(super) struct CallbackState<F> {
    callback: Mutex<F>,
    stopped: AtomicBool,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl<F> CallbackState<F> {
    pub(super) fn new(callback: F) -> CallbackState<F> {
        CallbackState {
            callback: Mutex::new(callback),
            stopped: AtomicBool::new(false),
            panic: Mutex::new(None),
        }
    }

    /// Runs the callback, never letting a panic unwind into C: it is kept and resumed
    /// once librbd has returned.
    pub(super) fn run(&self, call: impl FnOnce(&mut F) -> ControlFlow<()>) -> c_int {
        // librbd may still deliver results of requests it had in flight when we said
        // stop: the callback is promised not to see them.
        if self.stopped.load(Ordering::SeqCst) || self.panic.lock().is_some() {
            return -libc::ECANCELED;
        }
        match catch_unwind(AssertUnwindSafe(|| call(&mut self.callback.lock()))) {
            Ok(ControlFlow::Continue(())) => 0,
            Ok(ControlFlow::Break(())) => {
                self.stopped.store(true, Ordering::SeqCst);
                -libc::ECANCELED
            }
            Err(panic) => {
                *self.panic.lock() = Some(panic);
                -libc::ECANCELED
            }
        }
    }

    /// The call's result once librbd has returned `rc`: a stop asked for by the callback
    /// is success, a panic goes on unwinding.
    pub(super) fn finish(
        self,
        rc: c_int,
        op: &'static str,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        if let Some(panic) = self.panic.into_inner() {
            resume_unwind(panic);
        }
        if rc == -libc::ECANCELED && self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        check(rc.into(), op, what).map(|_| ())
    }
}

pub(super) unsafe extern "C" fn diff_callback<F>(
    offset: u64,
    len: usize,
    exists: c_int,
    arg: *mut c_void,
) -> c_int
where
    F: FnMut(Extent) -> ControlFlow<()>,
{
    // SAFETY: `arg` is the &CallbackState<F> diff_iterate passed, alive until
    // rbd_diff_iterate2 returns.
    let state = unsafe { &*(arg as *const CallbackState<F>) };
    state.run(|callback| {
        callback(Extent {
            offset,
            len: len as u64,
            exists: exists != 0,
        })
    })
}

pub(super) unsafe extern "C" fn progress_callback<F>(
    done: u64,
    total: u64,
    arg: *mut c_void,
) -> c_int
where
    F: FnMut(u64, u64),
{
    // SAFETY: `arg` is the &CallbackState<F> deep_copy passed, alive until librbd returns.
    let state = unsafe { &*(arg as *const CallbackState<F>) };
    state.run(|callback| {
        callback(done, total);
        ControlFlow::Continue(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_callback_is_resumed_after_the_call() {
        let state = CallbackState::new(|_: u64| -> ControlFlow<()> { panic!("boom") });
        assert_eq!(state.run(|f| f(1)), -libc::ECANCELED);
        let result = catch_unwind(AssertUnwindSafe(|| {
            state.finish(-libc::ECANCELED, "diff", String::new)
        }));
        assert!(result.is_err());
        let state = CallbackState::new(|_: u64| ControlFlow::Break(()));
        assert_eq!(state.run(|f| f(1)), -libc::ECANCELED);
        assert!(state.finish(-libc::ECANCELED, "diff", String::new).is_ok());
    }
}
