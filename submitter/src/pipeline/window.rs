//! How far ahead of its workers the runner keeps each task queue (the chaining window).

use std::time::{Duration, Instant};

/// What the runner knows of one task queue, to keep it a few tasks ahead of its consumers and no
/// more, so a file's next step queues behind a few first steps rather than behind every file's.
///
/// A consumer is a whole worker, which holds up to its prefetch of tasks (its slots and a few
/// more) that the broker no longer counts as waiting, and AMQP does not say how many. So the
/// runner learns it the way TCP learns a window: while reads find the queue empty (the consumers
/// took everything), it allows twice as many outstanding tasks; once a read finds tasks waiting,
/// the consumers are full and hold what is outstanding less what waits, and the runner keeps
/// [`ahead_allowed`] waiting beyond that.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ahead {
    /// Waiting in the queue, as last read and kept up to date between reads: +1 per task
    /// submitted, -1 per result (a finished task frees a slot, which takes a waiting one).
    pub(crate) waiting: u64,
    /// This session's tasks in the queue or held by its consumers.
    outstanding: u64,
    /// What the consumers were last seen to hold.
    held: u64,
    /// The last read found the queue empty: the consumers may take more than they hold.
    hungry: bool,
    consumers: u64,
    read_at: Instant,
}

impl Ahead {
    /// A queue not read yet.
    pub(crate) fn new() -> Self {
        Ahead {
            waiting: 0,
            outstanding: 0,
            held: 0,
            hungry: false,
            consumers: 0,
            read_at: Instant::now(),
        }
    }

    /// A task was submitted to the queue.
    pub(crate) fn submitted(&mut self) {
        self.waiting += 1;
        self.outstanding += 1;
    }

    /// A task of the queue finished: its slot takes a waiting one.
    pub(crate) fn finished(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    /// Whether the broker should be asked again now: the last read is old, or the consumers
    /// took everything and the window is used up (then the window may double).
    pub(crate) fn stale(&self) -> bool {
        let age = self.read_at.elapsed();
        age >= AHEAD_REREAD || (self.probing() && age >= AHEAD_PROBE)
    }

    /// The consumers took everything the window allowed: worth looking again soon.
    pub(crate) fn probing(&self) -> bool {
        self.hungry && self.room() == 0
    }
    /// How many more tasks the runner may submit to this queue now.
    pub(crate) fn room(&self) -> u64 {
        let base = ahead_allowed(self.consumers, self.held);
        let limit = if self.hungry {
            // Probe: as many again as the consumers hold.
            self.held.saturating_add(base.max(self.held))
        } else {
            self.held.saturating_add(base)
        };
        let by_outstanding = limit.saturating_sub(self.outstanding);
        let by_waiting = if self.hungry {
            by_outstanding
        } else {
            base.saturating_sub(self.waiting)
        };
        by_outstanding.min(by_waiting)
    }

    /// Takes a fresh read of the queue: `ready` tasks waiting, `consumers` consuming.
    pub(crate) fn observe(&mut self, ready: u64, consumers: u64) {
        self.waiting = ready;
        self.consumers = consumers;
        self.hungry = ready == 0 && consumers > 0;
        // Another batch's tasks in the same queue count in `ready`: the estimate errs low.
        let held = self.outstanding.saturating_sub(ready);
        self.held = if self.hungry {
            self.held.max(held)
        } else {
            held
        };
        self.read_at = Instant::now();
    }
}

/// How often the waiting count of a task queue is read again from the broker.
const AHEAD_REREAD: Duration = Duration::from_millis(500);
/// How soon it is read again while its consumers took everything and the runner has more to
/// give: the window then doubles about this often until the consumers are full.
pub(crate) const AHEAD_PROBE: Duration = Duration::from_millis(20);
/// Tasks kept waiting in a task queue with no consumer: enough for an autoscaler to see a
/// backlog and start workers.
const MIN_AHEAD: u64 = 4;
/// Tasks kept waiting per consumer of a task queue: enough to refill its slots while the
/// runner hears of the results, and to show an autoscaler a backlog that grows with the pool.
const AHEAD_PER_CONSUMER: u64 = 2;

/// The waiting tasks the runner keeps in a queue with `consumers` consumers holding `held`
/// tasks: a few per consumer, and at least half of what they hold. A pool of many slots finishes
/// short tasks in bursts of more than a few while the runner hears of their results: with fewer
/// waiting its slots would stand idle (a 32-slot worker of `true` tasks ran 0.3 ms per task
/// slower with 4 waiting). A file's next step still waits behind at most half a round of the
/// pool's tasks, not behind every file's first step.
fn ahead_allowed(consumers: u64, held: u64) -> u64 {
    MIN_AHEAD
        .max(consumers.saturating_mul(AHEAD_PER_CONSUMER))
        .max(held / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submits what the window allows, then lets a worker of `slots` (prefetch = slots) take
    /// what it can and reads the queue: returns the outstanding tasks after each read.
    fn probe(slots: u64, reads: usize) -> Vec<u64> {
        let mut ahead = Ahead::new();
        ahead.observe(0, 1);
        (0..reads)
            .map(|_| {
                for _ in 0..ahead.room() {
                    ahead.submitted();
                }
                let ready = ahead.outstanding.saturating_sub(slots);
                ahead.observe(ready, 1);
                ahead.outstanding
            })
            .collect()
    }

    #[test]
    fn the_window_doubles_while_the_consumers_take_everything_then_keeps_a_few_waiting() {
        // A worker of 4: 4 taken, probe to 8, 4 wait: no further.
        assert_eq!(probe(4, 4), vec![4, 8, 8, 8]);
        // A worker holding 32: 4, 8, 16, 32, 64 (32 wait), then no more until 16 wait.
        assert_eq!(probe(32, 7), vec![4, 8, 16, 32, 64, 64, 64]);
        let mut ahead = Ahead::new();
        ahead.outstanding = 64;
        ahead.observe(32, 1);
        assert_eq!(ahead.room(), 0, "32 wait, more than the 16 allowed");
        for _ in 0..30 {
            ahead.finished();
        }
        assert_eq!(ahead.room(), 14, "14 of the 16 waiting places are free");
        let mut small = Ahead::new();
        small.outstanding = 8;
        small.observe(4, 1);
        assert_eq!(small.room(), 0, "a worker of 4 gets 4 waiting, no more");
    }

    #[test]
    fn a_queue_without_consumers_gets_a_few_tasks_for_the_autoscaler_to_see() {
        let mut ahead = Ahead::new();
        ahead.observe(0, 0);
        assert_eq!(ahead.room(), MIN_AHEAD);
        for _ in 0..MIN_AHEAD {
            ahead.submitted();
        }
        ahead.observe(MIN_AHEAD, 0);
        assert_eq!(ahead.room(), 0);
        assert!(!ahead.probing());
    }

    #[test]
    fn another_batchs_waiting_tasks_make_the_window_smaller_never_larger() {
        let mut ahead = Ahead::new();
        ahead.observe(100, 3);
        assert_eq!(ahead.room(), 0);
        let mut idle = Ahead::new();
        idle.observe(0, 3);
        assert_eq!(idle.room(), ahead_allowed(3, 0));
    }
}
