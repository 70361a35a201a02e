//! Progress of a collection on stderr: a bar on a terminal, a plain line every few seconds
//! otherwise. Both say the same: counts, rate and ETA while results come, and why not when none
//! has come for a while.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use warren_submitter::collect::{Counts, Progress};

/// After this long without a new result, progress says so instead of an ETA.
const NO_RESULT_NOTICE: Duration = Duration::from_secs(15);

/// Progress on stderr: a bar on a terminal, a plain line every few seconds otherwise.
pub struct StderrProgress {
    batch: String,
    /// The bar on a terminal; None prints a line every [`Self::every`].
    bar: Option<ProgressBar>,
    /// When the last line was printed.
    last_line: Instant,
    every: Duration,
    /// When collection started, for the rate.
    started: Instant,
    /// Results done at the last change, and when it changed.
    last_done: u64,
    last_change: Instant,
}

impl StderrProgress {
    /// Picks the bar when stderr is a terminal.
    pub fn for_stderr(batch: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Self {
            batch: batch.to_string(),
            bar,
            last_line: now,
            every: Duration::from_secs(5),
            started: now,
            last_done: 0,
            last_change: now,
        }
    }

    /// Removes the bar before the summary is printed.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What follows the counts: the rate and ETA while results come; how long none has come, and
/// where the outstanding tasks are, when they stop.
fn outlook(counts: &Counts, rate: f64, quiet_for: Duration) -> String {
    if counts.consumers == Some(0) {
        return "ETA unknown (no worker is consuming the queue)".into();
    }
    let left = counts
        .total
        .map(|t| u64::from(t).saturating_sub(counts.done));
    if quiet_for >= NO_RESULT_NOTICE && left.is_some_and(|l| l > 0) {
        let left = left.unwrap_or_default();
        let queued = counts.queued.unwrap_or(0).min(left);
        let consumers = counts
            .consumers
            .map_or(String::new(), |c| format!(" by {c} consumer(s)"));
        return format!(
            "no result for {}s; {left} outstanding: {queued} queued, {} held{consumers}",
            quiet_for.as_secs(),
            left - queued
        );
    }
    match left {
        Some(left) if rate > 0.0 => format!(
            "{rate:.1}/s, ETA {}",
            humantime::format_duration(Duration::from_secs((left as f64 / rate).round() as u64))
        ),
        _ => format!("{rate:.1}/s, ETA unknown"),
    }
}

impl Progress for StderrProgress {
    fn update(&mut self, counts: &Counts) {
        if counts.done != self.last_done {
            self.last_done = counts.done;
            self.last_change = Instant::now();
        }
        let rate =
            (counts.done - counts.earlier) as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let outlook = outlook(counts, rate, self.last_change.elapsed());
        match &self.bar {
            Some(bar) => {
                if let Some(total) = counts.total {
                    bar.set_length(u64::from(total));
                }
                bar.set_position(counts.done);
                bar.set_message(format!(
                    "done, {} failed, {} retried, {outlook}",
                    counts.failed(),
                    counts.retried
                ));
            }
            None if self.last_line.elapsed() >= self.every => {
                self.last_line = Instant::now();
                let total = counts.total.map_or("?".to_string(), |t| t.to_string());
                eprintln!(
                    "batch {}: {}/{total} done, {} failed, {} retried, {outlook}",
                    self.batch,
                    counts.done,
                    counts.failed(),
                    counts.retried
                );
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_batch_says_where_its_tasks_are_instead_of_an_eta() {
        let counts = Counts {
            total: Some(100),
            done: 92,
            consumers: Some(2),
            queued: Some(3),
            ..Counts::default()
        };
        let busy = outlook(&counts, 4.0, Duration::from_secs(1));
        assert_eq!(busy, "4.0/s, ETA 2s");
        let quiet = outlook(&counts, 4.0, Duration::from_secs(40));
        assert_eq!(
            quiet,
            "no result for 40s; 8 outstanding: 3 queued, 5 held by 2 consumer(s)"
        );
        let idle = Counts {
            consumers: Some(0),
            ..counts.clone()
        };
        assert!(outlook(&idle, 0.0, Duration::from_secs(40)).contains("no worker"));
        let done = Counts {
            done: 100,
            ..counts
        };
        assert!(!outlook(&done, 4.0, Duration::from_secs(40)).contains("no result"));
    }
}
