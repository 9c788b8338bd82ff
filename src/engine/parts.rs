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
    /// `verify_reads`, `node`, `lease_seconds`, `targets.<name>.keep_last`) are used.
    /// From there on it starts as [`Engine::start`] does (`Engine::assemble`).
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
        Engine::assemble(config, state_lock, backends, targets)
    }

    /// The janitor's round, now rather than in a minute: finishes deletions and removes
    /// temporary snapshots an earlier attempt could not.
    pub fn run_janitor(&self) {
        for (name, target) in &self.inner.targets {
            self.inner.finish_leftovers(name, target.as_ref());
        }
    }
}
