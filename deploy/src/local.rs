//! The local backend: worker processes on this machine, started, stopped and restarted by the
//! autoscaler itself. Idle workers are stopped first, and every stop is a SIGTERM, so a worker
//! finishes what it runs before it exits.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tracing::{info, warn};
use warren_broker::depth::WorkerLoad;

use crate::backend::{Backend, BackendError, BackendErrorKind, PoolStatus};
use crate::error::DeployError;

/// A worker that exits this soon after starting, with a failure, counts as a crash.
const QUICK_EXIT: Duration = Duration::from_secs(10);
/// Crashes are remembered this long; while any is remembered the pool is not grown.
const CRASH_MEMORY: Duration = Duration::from_secs(60);

struct LocalWorker {
    name: String,
    child: Child,
    started: Instant,
    stopping: bool,
}

/// Worker processes run from one command line.
pub struct LocalBackend {
    command: Vec<String>,
    prefix: String,
    workers: Vec<LocalWorker>,
    next_id: u64,
    crashes: VecDeque<(Instant, String)>,
    stop_grace: Duration,
    /// The pool's queue, given to each worker as `WARREN_QUEUE`.
    queue: Option<String>,
}

impl LocalBackend {
    /// Runs `command` (e.g. `warren worker --queue q`) per worker, naming each worker
    /// `PREFIX-N` through `WARREN_WORKER_NAME`. `stop_grace` bounds the wait at shutdown.
    pub fn new(
        command: Vec<String>,
        prefix: impl Into<String>,
        stop_grace: Duration,
    ) -> Result<Self, DeployError> {
        if command.is_empty() {
            return Err(DeployError::Backend("the local backend needs the worker command after `--`, e.g. `-- warren worker --queue warren.tasks`".into()));
        }
        // Found now or never: otherwise every poll would fail to start a worker, for ever.
        if let Err(e) = which::which(&command[0]) {
            let advice = if command[0] == "warren" {
                " Put warren on PATH with `cargo install --path .` (from the repository), or give \
                 its full path, e.g. `-- target/release/warren worker ...`"
            } else {
                " Give its full path, or put it on PATH"
            };
            return Err(DeployError::Backend(format!(
                "the worker command '{}' cannot be run ({e}).{advice}",
                command[0]
            )));
        }
        Ok(Self {
            command,
            prefix: prefix.into(),
            workers: Vec::new(),
            next_id: 1,
            crashes: VecDeque::new(),
            stop_grace,
            queue: None,
        })
    }

    fn reap(&mut self) {
        let mut kept = Vec::with_capacity(self.workers.len());
        for mut worker in self.workers.drain(..) {
            match worker.child.try_wait() {
                Ok(None) => kept.push(worker),
                Ok(Some(status)) if worker.stopping => {
                    info!(worker = %worker.name, %status, "worker stopped")
                }
                Ok(Some(status)) => {
                    let quick = worker.started.elapsed() < QUICK_EXIT;
                    if !status.success() && quick {
                        warn!(worker = %worker.name, %status, "worker exited right after starting; not growing the pool while workers crash (see its log above)");
                        self.crashes
                            .push_back((Instant::now(), format!("{}: {status}", worker.name)));
                    } else {
                        warn!(worker = %worker.name, %status, "worker exited; it will be replaced");
                    }
                }
                Err(e) => warn!(worker = %worker.name, "cannot check the worker process: {e}"),
            }
        }
        self.workers = kept;
        while self
            .crashes
            .front()
            .is_some_and(|(at, _)| at.elapsed() > CRASH_MEMORY)
        {
            self.crashes.pop_front();
        }
    }

    /// Runs the workers for `queue`: they get it as `WARREN_QUEUE` (what `warren worker --queue`
    /// defaults to), and a command that names another queue is refused, as its workers would
    /// never take this pool's tasks.
    pub fn for_queue(mut self, queue: &str) -> Result<Self, DeployError> {
        let named = self.command.iter().enumerate().find_map(|(i, arg)| {
            arg.strip_prefix("--queue=").or_else(|| {
                (arg == "--queue").then(|| self.command.get(i + 1).map(String::as_str))?
            })
        });
        if let Some(other) = named
            && other != queue
        {
            return Err(DeployError::Backend(format!(
                "the worker command consumes '{other}' (--queue {other}) but this pool serves \
                 '{queue}': its workers would never take the pool's tasks. Drop --queue from the \
                 command (the workers get WARREN_QUEUE={queue}) or make the two agree"
            )));
        }
        self.queue = Some(queue.to_string());
        Ok(self)
    }

    fn spawn(&mut self) -> Result<(), BackendError> {
        let name = format!("{}-{}", self.prefix, self.next_id);
        self.next_id += 1;
        let mut command = Command::new(&self.command[0]);
        if let Some(queue) = &self.queue {
            command.env("WARREN_QUEUE", queue);
        }
        let child = command
            .args(&self.command[1..])
            .env("WARREN_WORKER_NAME", &name)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| BackendError {
                kind: BackendErrorKind::Other,
                message: format!("cannot start worker command '{}': {e}", self.command[0]),
            })?;
        info!(worker = %name, pid = child.id(), "worker started");
        self.workers.push(LocalWorker {
            name,
            child,
            started: Instant::now(),
            stopping: false,
        });
        Ok(())
    }

    fn live(&self) -> impl Iterator<Item = &LocalWorker> {
        self.workers.iter().filter(|w| !w.stopping)
    }
}

fn terminate(worker: &LocalWorker) {
    if let Some(pid) = worker.child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

impl Backend for LocalBackend {
    fn describe(&self) -> String {
        format!("local processes `{}`", self.command.join(" "))
    }

    async fn status(&mut self) -> Result<PoolStatus, BackendError> {
        self.reap();
        let replicas = u32::try_from(self.live().count()).unwrap_or(u32::MAX);
        Ok(PoolStatus {
            replicas,
            ready: replicas,
            stalled: u32::try_from(self.crashes.len()).unwrap_or(u32::MAX),
            stalled_detail: self
                .crashes
                .back()
                .map(|(_, what)| format!("recent crash: {what}")),
        })
    }

    async fn scale(&mut self, desired: u32, loads: &[WorkerLoad]) -> Result<(), BackendError> {
        let live = self.live().count();
        let desired = desired as usize;
        for _ in live..desired {
            self.spawn()?;
        }
        if desired < live {
            // Idle workers first, then the least busy; among equals the newest.
            let load = |name: &str| {
                loads
                    .iter()
                    .find(|l| l.name == name)
                    .map_or(0, |l| l.unacked)
            };
            let mut candidates: Vec<(u64, Instant, usize)> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.stopping)
                .map(|(i, w)| (load(&w.name), w.started, i))
                .collect();
            candidates.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            for (busy, _, index) in candidates.into_iter().take(live - desired) {
                let worker = &mut self.workers[index];
                info!(worker = %worker.name, running_tasks = busy, "stopping worker (it finishes its tasks first)");
                terminate(worker);
                worker.stopping = true;
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        for worker in &mut self.workers {
            terminate(worker);
            worker.stopping = true;
        }
        let deadline = Instant::now() + self.stop_grace;
        for worker in &mut self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, worker.child.wait())
                .await
                .is_err()
            {
                warn!(worker = %worker.name, "worker did not stop in time; killing it");
                let _ = worker.child.kill().await;
            }
        }
        self.workers.clear();
    }
}
