//! The generation task: a prompt in, the model's continuation out.

mod files;

pub use files::DEFAULT_FILES;

use super::{LoadContext, LoadFailure, Task};
use crate::engine::EngineStats;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::watch;

/// A causal language model served for `Generate` (being built).
pub struct GenerationTask {
    stats: Arc<EngineStats>,
    failure: watch::Receiver<Option<String>>,
}

impl GenerationTask {
    /// Loads the model (being built).
    pub async fn load(_context: LoadContext) -> Result<Self, LoadFailure> {
        Err(LoadFailure::permanent("the generation task is being built"))
    }
}

impl Task for GenerationTask {
    fn name(&self) -> &'static str {
        "generation"
    }
    fn answers(&self) -> &'static str {
        "Generate"
    }
    fn warm_up(self: Arc<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }
    fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.clone()
    }
}
