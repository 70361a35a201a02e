//! Warren's worker: consumes tasks from a RabbitMQ queue with manual acknowledgements, runs them
//! with registered handlers (external commands or Rust functions) and publishes each result
//! before acknowledging its task.
//!
//! Build a worker binary of your own with [`Worker::new`], [`Worker::handler`] and
//! [`Worker::run`]; see `examples/custom_worker.rs`.

#![warn(missing_docs)]

mod answer;
mod cancel;
mod delivery;
pub mod handler;
pub mod handlers;
pub mod harden;
mod logbook;
pub mod metrics;
mod retry;
mod runtime;
mod settle;

pub use handler::{Handler, HandlerFuture, HandlerResult, Registry, Task, TaskFailure};
pub use handlers::exec::ExecPolicy;
pub use runtime::{
    DEFAULT_CONFIRM_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PUBLISH_RETRY_FOR,
    DEFAULT_TASK_TIMEOUT, Worker, WorkerConfig, WorkerError, default_name,
};
pub use warren_broker::AmqpSettings;
pub use warren_broker::endpoints::shutdown_signal;
