//! What every subcommand shares: exit statuses, Ctrl-C, connection names, error output.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Exit status: every task succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: at least one task failed, timed out or was rejected.
pub const EXIT_TASK_FAILED: u8 = 1;
/// Exit status: bad usage or input, or the broker could not be used.
pub const EXIT_USAGE_OR_CONNECTION: u8 = 2;
/// Exit status: stopped waiting before every result was in (timeout or Ctrl-C).
pub const EXIT_INCOMPLETE: u8 = 3;
/// Exit status: `submit` stopped by Ctrl-C while publishing (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A flag set when Ctrl-C (SIGINT) arrives, for commands that stop cleanly rather than die.
pub fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    stop
}

/// The AMQP connection name of a process in `role`: host and pid, as `rabbitmqctl` shows it.
pub fn connection_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("warren-{role}@{host}-{}", std::process::id())
}

/// A number of seconds from the command line, when it is finite and not negative.
pub fn seconds(value: f64) -> Option<std::time::Duration> {
    warren_broker::settings::seconds("", value, false).ok()
}

/// Prints `error: MESSAGE` and gives the exit status of bad usage or input.
pub fn fail(message: &str) -> u8 {
    eprintln!("error: {message}");
    EXIT_USAGE_OR_CONNECTION
}
