//! A fixed pool of threads for FUSE requests whose answer waits on storage, so that the
//! session's own threads keep answering `ls`, `cat jobs` and a restore's writes. The mount
//! has two: one for slow requests (attaching or detaching a volume, zeroing it, deleting
//! a backup, a server-side copy) and one for reads of images and volumes, so that neither
//! queues behind the other. Bounded: a burst queues here instead of starting a thread
//! each. Waiting for a job takes no thread at all (the job calls back).

use parking_lot::Mutex;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use tracing::error;

type Task = Box<dyn FnOnce() + Send>;

pub struct Pool {
    sender: Mutex<mpsc::Sender<Task>>,
}

impl Pool {
    /// `threads` threads named `<name>-<i>`.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Pool> {
        let (sender, receiver) = mpsc::channel::<Task>();
        let receiver = std::sync::Arc::new(Mutex::new(receiver));
        for i in 0..threads {
            let receiver = receiver.clone();
            let name = name.to_string();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    loop {
                        let task = receiver.lock().recv();
                        let Ok(task) = task else { return };
                        // A panic is answered EIO by the dropped reply; the thread lives on.
                        if std::panic::catch_unwind(AssertUnwindSafe(task)).is_err() {
                            error!("bug: a FUSE request panicked on {name}-{i}; answered EIO");
                        }
                    }
                })?;
        }
        Ok(Pool {
            sender: Mutex::new(sender),
        })
    }

    /// Runs `task` on one of the pool's threads, in the order given.
    pub fn run(&self, task: impl FnOnce() + Send + 'static) {
        if self.sender.lock().send(Box::new(task)).is_err() {
            // Only when every thread is gone, which only a panic in recv could do.
            error!("bug: the slow-request pool is gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn tasks_run_and_a_panic_does_not_stop_the_pool() {
        let pool = Pool::new("test", 2).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        pool.run(|| panic!("a bug"));
        for _ in 0..10 {
            let done = done.clone();
            pool.run(move || {
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while done.load(Ordering::Relaxed) < 10 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
