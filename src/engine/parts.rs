//! An engine made from parts a test chose (`cfg(test)` or the `testing` feature): its
//! volume drivers and targets handed in rather than opened from the configuration, so
//! the whole engine runs over in-memory storage (`volume::memory`). Start-up is the
//! daemon's own from there on: recovery, the listing of recent jobs, the workers.

use super::*;

/// One volume backend of an engine made from parts.
pub struct BackendPart {
    pub name: String,
    pub driver: Arc<dyn VolumeDriver>,
    /// The pools that serve volumes (a target's pool is not one of them).
    pub volume_pools: Vec<String>,
}

impl Engine {
    /// An engine over `backends` and `targets`; of `config` only the engine's settings
    /// (`state_dir`, which it locks, `max_parallel_jobs`, `copy_bps_limit`,
    /// `verify_reads`, `targets.<name>.keep_last`) are used. Recovers what the targets'
    /// records say was left, as [`Engine::start`] does, then starts the workers.
    pub fn from_parts(
        config: Config,
        backends: Vec<BackendPart>,
        targets: Vec<Arc<dyn BackupTarget>>,
    ) -> Result<Engine> {
        let state_lock = take_state_lock(&config)?;
        let backends = backends
            .into_iter()
            .map(|part| {
                let backend = Backend {
                    driver: part.driver,
                    volume_pools: part.volume_pools,
                };
                (part.name, backend)
            })
            .collect();
        let targets = targets
            .into_iter()
            .map(|target| (target.name().to_string(), target))
            .collect();
        let inner = Arc::new(Inner {
            backends,
            devices: Backend {
                driver: Arc::new(crate::volume::block::DeviceDriver::default()),
                volume_pools: Vec::new(),
            },
            targets,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            stop: Condvar::new(),
            sums: image::SumsCache::default(),
            blocks: Arc::new(image::BlockCache::default()),
            record_updates: Mutex::new(()),
            restores: Mutex::new(Vec::new()),
            provenance: provenance::Provenance::default(),
            counters: metrics::Counters::default(),
            config,
            state_lock,
        });
        inner.recover();
        inner.list_recent_jobs();
        let mut threads = Vec::new();
        for i in 0..inner.config.max_parallel_jobs {
            let worker = inner.clone();
            threads.push(spawn(format!("job-worker-{i}"), move || worker.worker())?);
        }
        let janitor = inner.clone();
        threads.push(spawn("janitor".to_string(), move || janitor.janitor())?);
        Ok(Engine {
            inner,
            threads: Mutex::new(threads),
        })
    }

    /// The janitor's round, now rather than in a minute: finishes deletions and removes
    /// temporary snapshots an earlier attempt could not.
    pub fn run_janitor(&self) {
        for (name, target) in &self.inner.targets {
            self.inner.finish_leftovers(name, target.as_ref());
        }
    }
}

fn spawn(name: String, run: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(run)
        .map_err(|source| EngineError::io("start a worker thread", source))
}
