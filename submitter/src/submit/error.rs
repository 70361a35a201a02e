//! Why a submission failed, and what it leaves to resume.

use std::time::Duration;

use warren_broker::BrokerError;

use crate::journal::Journal;
use crate::spec::SpecError;

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A task cannot be sent as given.
    #[error("task {index} (id '{id}'): {message}")]
    Task {
        /// 0-based position in the batch.
        index: usize,
        /// Task id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// A task line cannot be used (or the task file cannot be read).
    #[error("{0}")]
    Spec(#[from] SpecError),
    /// The broker could not be used, even after retrying.
    #[error("{0}")]
    Broker(#[from] BrokerError),
    /// Publishing was stopped on request (`SubmitOptions::stop`); the confirmed tasks will run.
    #[error(
        "stopped: {} of {} task(s) of batch {} were confirmed by RabbitMQ and will run; the others were not submitted",
        journal.confirmed_count(),
        journal.total,
        journal.batch
    )]
    Stopped {
        /// The batch and which of its tasks were confirmed.
        journal: Box<Journal>,
    },
    /// The connection failed for longer than the retry budget (or fatally) part-way through:
    /// the confirmed tasks will run; the journal says which, for [`super::Submitter::resume`].
    #[error(
        "{source}. {}batch {} stopped part-way: {} of {} task(s) were confirmed by RabbitMQ and \
         will run; the others were not submitted",
        if source.is_fatal() { String::new() } else { format!("Gave up after {retry_for:?} of failures (--retry-for); ") },
        journal.batch,
        journal.confirmed_count(),
        journal.total
    )]
    Interrupted {
        /// The batch and which of its tasks were confirmed.
        journal: Box<Journal>,
        /// The retry budget that ran out.
        retry_for: Duration,
        /// The last failure.
        source: Box<BrokerError>,
    },
}

impl SubmitError {
    /// The record of an interrupted batch, which [`super::Submitter::resume`] finishes.
    pub fn journal(&self) -> Option<&Journal> {
        match self {
            SubmitError::Interrupted { journal, .. } | SubmitError::Stopped { journal } => {
                Some(journal)
            }
            _ => None,
        }
    }
}
