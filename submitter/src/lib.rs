//! Warren's client library: submit batches of tasks, follow them, and collect their results.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use warren_submitter::{Submitter, SubmitOptions, TaskSpec, CollectOptions, JsonLines};
//! let mut submitter = Submitter::new(Default::default(), "my-script");
//! let tasks = vec![TaskSpec::exec(vec!["sha256sum".into(), "/data/in.tif".into()])];
//! let receipt = submitter.submit(&tasks, &SubmitOptions::new("warren.tasks")).await?;
//! let mut out = JsonLines::new(std::io::stdout());
//! submitter
//!     .collect(&receipt.batch, &mut out, &mut (), &CollectOptions::default(), std::future::pending())
//!     .await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod batches;
mod checkpoint;
pub mod collect;
pub mod dlq;
pub mod fanout;
pub mod journal;
pub mod logs;
pub mod open_batch;
pub mod output;
pub mod pipeline;
pub mod seqset;
pub mod spec;
pub mod status;
pub mod submit;

pub use collect::{
    CollectError, CollectOptions, Counts, NO_CONSUMER_WARN_AFTER, Outcome, Progress, ResultSink,
};
pub use open_batch::OpenBatch;
pub use output::JsonLines;
pub use spec::{SpecSource, TaskFile, TaskSpec};
pub use submit::{BatchReceipt, SubmitError, SubmitOptions, Submitter, prepare};
