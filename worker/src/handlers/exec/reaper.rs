//! Commands die with their worker. A `kill -9`'d or OOM-killed worker cannot clean up, and the
//! broker redelivers its tasks, so surviving commands would run twice at once. Two layers:
//! - each command's process group leader gets `PR_SET_PDEATHSIG` (SIGKILL): it dies with the
//!   worker's thread that started it;
//! - a small `/bin/sh` watcher, started once per worker process, is told every running process
//!   group over a pipe only the worker holds. When the worker dies the kernel closes that pipe,
//!   the watcher reads end-of-file and kills every group still registered, grandchildren too.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use tracing::warn;

/// Reads `+PGID` / `-PGID` lines; at end of input kills the groups still listed.
const WATCHER_SCRIPT: &str = r#"groups=""
while IFS= read -r line; do
  case "$line" in
    +*) groups="$groups ${line#+}" ;;
    -*) keep=""; for g in $groups; do [ "$g" = "${line#-}" ] || keep="$keep $g"; done; groups=$keep ;;
  esac
done
for g in $groups; do kill -KILL "-$g" 2>/dev/null; done
"#;

struct Watcher {
    stdin: ChildStdin,
    // Kept so the watcher is reaped by nobody else; it exits on its own at end of input.
    _child: Child,
}

fn watcher() -> Option<&'static Mutex<Watcher>> {
    static WATCHER: OnceLock<Option<Mutex<Watcher>>> = OnceLock::new();
    WATCHER
        .get_or_init(|| {
            let spawned = Command::new("/bin/sh")
                .args(["-c", WATCHER_SCRIPT, "warren-exec-watcher"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own group: a Ctrl-C meant for the worker must not kill it first.
                .process_group(0)
                .env_clear()
                .spawn();
            match spawned {
                Ok(mut child) => {
                    let stdin = child.stdin.take()?;
                    Some(Mutex::new(Watcher {
                        stdin,
                        _child: child,
                    }))
                }
                Err(e) => {
                    warn!("cannot start the exec watcher (/bin/sh): {e}; commands may outlive a killed worker");
                    None
                }
            }
        })
        .as_ref()
}

fn tell(line: String) {
    let Some(watcher) = watcher() else { return };
    let mut watcher = match watcher.lock() {
        Ok(w) => w,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Err(e) = watcher.stdin.write_all(line.as_bytes()) {
        // Said once: every task would repeat it.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            warn!("exec watcher is gone ({e}); commands may outlive a killed worker");
        });
    }
}

/// Starts the watcher now, so the first task does not pay for it.
pub(crate) fn start() {
    let _ = watcher();
}

/// A registered process group: killed (with everything in it) and unregistered when dropped, on
/// completion, timeout or cancellation alike.
pub(crate) struct ProcessGroup(Option<i32>);

impl ProcessGroup {
    /// Registers the group led by `leader` (a command spawned with `process_group(0)`).
    pub(crate) fn register(leader: Option<u32>) -> Self {
        let pgid = leader.and_then(|p| i32::try_from(p).ok());
        if let Some(pgid) = pgid {
            tell(format!("+{pgid}\n"));
        }
        Self(pgid)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH (the group is already gone) is the normal case after a clean exit.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
            tell(format!("-{pgid}\n"));
        }
    }
}

/// For `pre_exec`: the command is killed when the worker (the thread that forked it) dies.
/// Only async-signal-safe calls: this runs between fork and exec.
pub(crate) fn die_with_parent(parent: nix::unistd::Pid) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // The worker may have died before the line above: then nobody would send the signal.
    if nix::unistd::getppid() != parent {
        return Err(std::io::Error::other(
            "the worker exited while starting the command",
        ));
    }
    Ok(())
}
