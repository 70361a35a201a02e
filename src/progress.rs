//! Progress of a collection on stderr: a bar on a terminal, a plain line every few seconds
//! otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use warren_submitter::collect::{Counts, Progress};

/// Progress on stderr: a bar on a terminal, a plain line every few seconds otherwise.
pub enum StderrProgress {
    /// Interactive bar.
    Bar(ProgressBar),
    /// One line per interval, for logs.
    Lines {
        /// Batch id shown in each line.
        batch: String,
        /// When the last line was printed.
        last: Instant,
        /// Interval between lines.
        every: Duration,
        /// When collection started, for the rate.
        started: Instant,
    },
}

impl StderrProgress {
    /// Picks the bar when stderr is a terminal.
    pub fn for_stderr(batch: &str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            Self::Bar(bar)
        } else {
            Self::Lines {
                batch: batch.to_string(),
                last: Instant::now(),
                every: Duration::from_secs(5),
                started: Instant::now(),
            }
        }
    }

    /// Removes the bar before the summary is printed.
    pub fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

impl Progress for StderrProgress {
    fn update(&mut self, counts: &Counts) {
        match self {
            Self::Bar(bar) => {
                if let Some(total) = counts.total {
                    bar.set_length(u64::from(total));
                }
                bar.set_position(counts.done);
                let idle = if counts.consumers == Some(0) {
                    " (no worker is consuming the queue)"
                } else {
                    ""
                };
                bar.set_message(format!(
                    "done, {} failed, {} retried{idle}",
                    counts.failed(),
                    counts.retried
                ));
            }
            Self::Lines {
                batch,
                last,
                every,
                started,
            } => {
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    let total = counts.total.map_or("?".to_string(), |t| t.to_string());
                    let rate = (counts.done - counts.earlier) as f64
                        / started.elapsed().as_secs_f64().max(0.001);
                    let eta = match counts.total {
                        Some(t) if rate > 0.0 => {
                            let left = u64::from(t).saturating_sub(counts.done) as f64 / rate;
                            humantime::format_duration(std::time::Duration::from_secs(
                                left.round() as u64
                            ))
                            .to_string()
                        }
                        _ => "unknown".to_string(),
                    };
                    let eta = if counts.consumers == Some(0) {
                        "unknown (no worker is consuming the queue)".to_string()
                    } else {
                        eta
                    };
                    eprintln!(
                        "batch {batch}: {}/{total} done, {} failed, {} retried, {rate:.1}/s, ETA {eta}",
                        counts.done,
                        counts.failed(),
                        counts.retried
                    );
                }
            }
        }
    }
}
