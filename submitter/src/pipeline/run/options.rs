//! What a caller gives [`super::run`] and gets back: the run's options and their defaults, how
//! a run ended, why it could not go on, and the progress callback.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use warren_broker::BrokerError;
use warren_broker::protocol;
use warren_broker::topology;

use crate::pipeline::plan::{Plan, StageCounts};

/// Default of [`RunOptions::max_queued`].
pub const DEFAULT_MAX_QUEUED: usize = 10_000;

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run's id: new, or the one to resume.
    pub run: String,
    /// Continue the run `run` from its recorded state.
    pub resume: bool,
    /// Run every item, even those whose outputs are up to date.
    pub force: bool,
    /// Most tasks submitted and not yet finished at once (a bound on the runner's memory and on
    /// what one run puts in the queues). Within it, each task queue is kept a few tasks ahead of
    /// its consumers (see `window.rs`), so a file's next step never queues behind every
    /// file's first one.
    pub max_queued: usize,
    /// Treat every chained stage as a barrier (for comparisons: each stage waits for the whole of
    /// the one before).
    pub barriers: bool,
    /// Create task queues that do not exist.
    pub create_queue: bool,
    /// How long to keep retrying a lost connection.
    pub retry_for: Duration,
    /// Set to stop early (Ctrl-C): state is recorded; submitted tasks still run.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// How long an uncollected run's queues are kept.
    pub expiry: Duration,
}

impl RunOptions {
    /// Defaults for a new run.
    pub fn new() -> Self {
        Self {
            run: protocol::new_id(),
            resume: false,
            force: false,
            max_queued: DEFAULT_MAX_QUEUED,
            barriers: false,
            create_queue: false,
            retry_for: warren_broker::connection::DEFAULT_COLLECT_RETRY_FOR,
            stop: None,
            timeout: None,
            expiry: topology::DEFAULT_RESULT_EXPIRY,
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Every stage finished (some items may have failed: see the plan).
    Finished,
    /// Stopped early (Ctrl-C or the timeout); `warren run --resume` continues.
    Stopped,
}

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The pipeline, its items or its recorded state cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// The broker failed, even after retrying.
    #[error("{0}")]
    Broker(#[from] BrokerError),
}

impl From<lapin::Error> for RunError {
    fn from(e: lapin::Error) -> Self {
        RunError::Broker(BrokerError::from(e))
    }
}

/// Told about progress.
pub trait RunProgress {
    /// The plan changed; `counts` are its counts per stage, with what is queued.
    fn update(&mut self, plan: &Plan, counts: &[StageCounts]);
}
