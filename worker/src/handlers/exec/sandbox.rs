//! The boundary around every `exec` command. `--allow-exec` names which programs run, not what
//! they can do (GDAL's `--config`, an interpreter's `-c`), so the process itself is confined:
//! - Landlock: the filesystem is the data roots (read-write), the system folders and
//!   `--sandbox-read` roots (read-only), and a private TMPDIR (read-write, removed after); TCP
//!   bind and connect only to `--sandbox-net-allow` ports; no signal to, or abstract socket of,
//!   any process outside the sandbox (the worker above all);
//! - no new privileges, and no capabilities: a root worker's commands run as `--run-as USER`, or
//!   keep uid 0 with every capability dropped;
//! - resource limits (address space, CPU time, file size, open files, processes).
//!
//! Everything that allocates or opens files (the ruleset, the TMPDIR) is prepared in the worker;
//! the forked child only makes system calls ([`Prepared::enter`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, path_beneath_rules,
};

/// Read-only roots every command gets: where programs, their libraries and their data live.
pub const SYSTEM_READ_ROOTS: [&str; 9] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Device files every command may read and write.
const DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The newest Landlock ABI whose rights this worker asks for; older kernels get what they have.
const WANTED_ABI: ABI = ABI::V6;

/// Resource limits of one command (`setrlimit`); None leaves the worker's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Address space, bytes (`RLIMIT_AS`).
    pub memory_bytes: Option<u64>,
    /// CPU time, seconds (`RLIMIT_CPU`).
    pub cpu_seconds: Option<u64>,
    /// Largest file it may write, bytes (`RLIMIT_FSIZE`).
    pub file_bytes: Option<u64>,
    /// Open files (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// Processes of its user (`RLIMIT_NPROC`; counted per user by the kernel).
    pub processes: Option<u64>,
}

/// How the worker confines commands (the `--data-root`, `--sandbox-*`, `--run-as` and
/// `--limit-*` flags).
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// Read-write roots; none means the worker's working folder.
    pub data_roots: Vec<PathBuf>,
    /// Read-only roots beside [`SYSTEM_READ_ROOTS`].
    pub read_roots: Vec<PathBuf>,
    /// TCP ports commands may connect to and bind.
    pub net_allow: Vec<u16>,
    /// Where each command's private TMPDIR is made; default: a folder in the system's temp dir.
    pub tmp_base: Option<PathBuf>,
    /// User the commands run as (a root worker only).
    pub run_as: Option<String>,
    /// Resource limits of each command.
    pub limits: Limits,
    /// Files that must stay out of every root: the worker's credentials.
    pub secrets: Vec<PathBuf>,
}

/// The sandbox in force, with its roots resolved.
#[derive(Debug)]
pub struct Sandbox {
    data_roots: Vec<PathBuf>,
    read_roots: Vec<PathBuf>,
    net_allow: Vec<u16>,
    tmp_base: PathBuf,
    run_as: Option<nix::unistd::User>,
    drop_root: bool,
    limits: Limits,
    abi: i32,
}

/// What a command needs from the sandbox, made before it is forked.
#[derive(Debug)]
pub(crate) struct Prepared {
    ruleset: OwnedFd,
    tmpdir: tempfile::TempDir,
    limits: Limits,
    drop_root: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Sandbox {
    /// Resolves `config`: roots made absolute (a data root must exist), secrets checked to lie
    /// outside every root, the TMPDIR base made. Fails when the kernel has no Landlock, naming
    /// `--no-sandbox` as the way to run without.
    // Long: a checklist of the sandbox's configuration, each check with its own message; split, the
    // checks would only move apart.
    pub fn new(config: SandboxConfig) -> Result<Self, String> {
        let abi = landlock_abi();
        if abi < 1 {
            return Err(
                "this kernel does not offer Landlock (Linux 5.13 or later, with landlock in the \
                 `lsm=` boot list), so exec tasks cannot be confined to their data roots. Run \
                 the worker on such a kernel, or accept unconfined commands with --no-sandbox"
                    .into(),
            );
        }
        let defaulted = config.data_roots.is_empty();
        let data_roots = if defaulted {
            vec![std::env::current_dir().map_err(|e| format!("the working folder: {e}"))?]
        } else {
            config.data_roots
        };
        let data_roots = data_roots
            .iter()
            .map(|root| {
                std::fs::canonicalize(root)
                    .map_err(|e| format!("--data-root {}: {e}", root.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for root in &data_roots {
            if root == Path::new("/") {
                return Err(if defaulted {
                    "without --data-root the worker's working folder is the tasks' data root, and \
                     it is / here: give --data-root DIR (the folder of the tasks' files), or start \
                     the worker in that folder"
                        .into()
                } else {
                    "--data-root /: a data root must be a folder for the tasks' data, not the \
                     whole filesystem"
                        .into()
                });
            }
        }
        // Read roots that do not exist here (/lib32 on most machines) are simply left out.
        let read_roots: Vec<PathBuf> = SYSTEM_READ_ROOTS
            .iter()
            .map(PathBuf::from)
            .chain(config.read_roots)
            .filter_map(|root| std::fs::canonicalize(root).ok())
            .collect();
        let tmp_base = config
            .tmp_base
            .unwrap_or_else(|| std::env::temp_dir().join("warren-task-tmp"));
        std::fs::create_dir_all(&tmp_base)
            .map_err(|e| format!("the tasks' TMPDIR folder {}: {e}", tmp_base.display()))?;
        let tmp_base = std::fs::canonicalize(&tmp_base)
            .map_err(|e| format!("the tasks' TMPDIR folder {}: {e}", tmp_base.display()))?;
        // A base made by someone else (a shared /tmp) could be used to reach the tasks' folders.
        let owner = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(&tmp_base)
                .map_err(|e| format!("the tasks' TMPDIR folder {}: {e}", tmp_base.display()))?,
        );
        if owner != nix::unistd::geteuid().as_raw() {
            return Err(format!(
                "the tasks' TMPDIR folder {} belongs to another user (uid {owner}); give the \
                 worker a folder of its own with --sandbox-tmp DIR",
                tmp_base.display()
            ));
        }
        // Others may pass through to their own folder but not list the others'.
        set_mode(&tmp_base, 0o711)?;
        for secret in &config.secrets {
            let Ok(secret) = std::fs::canonicalize(secret) else {
                continue;
            };
            if let Some(root) = data_roots
                .iter()
                .chain(&read_roots)
                .find(|r| secret.starts_with(r))
            {
                return Err(format!(
                    "{} holds the worker's credentials but lies under the sandbox root {}, so \
                     every task could read it: mount it elsewhere (e.g. /run/secrets/warren, \
                     /var/run/warren) or change the roots",
                    secret.display(),
                    root.display()
                ));
            }
        }
        let is_root = nix::unistd::geteuid().is_root();
        let run_as = match &config.run_as {
            Some(name) if !is_root => {
                return Err(format!(
                    "--run-as {name} needs a worker running as root (it runs as uid {})",
                    nix::unistd::geteuid()
                ));
            }
            Some(name) => Some(
                nix::unistd::User::from_name(name)
                    .map_err(|e| format!("--run-as {name}: {e}"))?
                    .ok_or_else(|| format!("--run-as {name}: no such user on this machine"))?,
            ),
            None => None,
        };
        Ok(Self {
            data_roots,
            read_roots,
            net_allow: config.net_allow,
            tmp_base,
            drop_root: is_root && run_as.as_ref().is_none_or(|u| u.uid.is_root()),
            run_as,
            limits: config.limits,
            abi,
        })
    }

    /// One line for the worker's log: what commands may reach.
    pub fn describe(&self) -> String {
        let roots = |r: &[PathBuf]| {
            r.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let user = match (&self.run_as, self.drop_root) {
            (Some(user), false) => format!("as user {}", user.name),
            (_, true) => "as uid 0 without capabilities (--run-as gives them a user)".into(),
            (None, false) => "as the worker's user".into(),
        };
        format!(
            "exec sandbox (Landlock ABI {}): read-write {}; read-only {}; TCP ports {}; {user}",
            self.abi,
            roots(&self.data_roots),
            roots(&self.read_roots),
            if self.net_allow.is_empty() {
                "none".to_string()
            } else {
                self.net_allow
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        )
    }

    /// Whether `path` (absolute, or relative to `cwd`) lies under a data root, after resolving
    /// `..` and symlinks as far as the path exists.
    pub fn within_data_roots(&self, path: &Path) -> bool {
        let resolved = resolve_lexically(path);
        self.data_roots
            .iter()
            .any(|root| resolved.starts_with(root))
    }

    /// The limits of a command that asks for `asked`: each the task's value where it gives one,
    /// else the worker's cap; a value above the worker's cap is refused, naming it.
    pub fn limits_for(
        &self,
        asked: Option<&warren_broker::protocol::ExecLimits>,
    ) -> Result<Limits, String> {
        let Some(asked) = asked else {
            return Ok(self.limits);
        };
        let pick = |name: &str, task: Option<u64>, cap: Option<u64>, flag: &str| match (task, cap) {
            (Some(t), Some(c)) if t > c => Err(format!(
                "limits.{name} = {t} is above this worker's cap of {c} ({flag}); a task may ask \
                 for less, never more"
            )),
            (Some(t), _) => Ok(Some(t)),
            (None, cap) => Ok(cap),
        };
        Ok(Limits {
            memory_bytes: pick(
                "memory_bytes",
                asked.memory_bytes,
                self.limits.memory_bytes,
                "--limit-memory",
            )?,
            cpu_seconds: pick("cpu_s", asked.cpu_s, self.limits.cpu_seconds, "--limit-cpu")?,
            file_bytes: pick(
                "file_bytes",
                asked.file_bytes,
                self.limits.file_bytes,
                "--limit-file-size",
            )?,
            open_files: pick(
                "open_files",
                asked.open_files,
                self.limits.open_files,
                "--limit-open-files",
            )?,
            processes: pick(
                "processes",
                asked.processes,
                self.limits.processes,
                "--limit-processes",
            )?,
        })
    }

    /// Builds the Landlock ruleset and the private TMPDIR for one command that runs `program`
    /// with `limits`.
    pub(crate) fn prepare(&self, program: &Path, limits: Limits) -> Result<Prepared, String> {
        let tmpdir = tempfile::Builder::new()
            .prefix("task-")
            .tempdir_in(&self.tmp_base)
            .map_err(|e| {
                format!(
                    "cannot make the task's TMPDIR in {}: {e}",
                    self.tmp_base.display()
                )
            })?;
        if let Some(user) = &self.run_as {
            nix::unistd::chown(tmpdir.path(), Some(user.uid), Some(user.gid))
                .map_err(|e| format!("cannot give the task's TMPDIR to {}: {e}", user.name))?;
        }
        let abi = WANTED_ABI;
        let failed = |e: landlock::RulesetError| format!("cannot build the Landlock ruleset: {e}");
        let ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(abi))
            .map_err(failed)?
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(failed)?
            .scope(Scope::from_all(abi))
            .map_err(failed)?
            .create()
            .map_err(failed)?
            .add_rules(path_beneath_rules(
                &self.read_roots,
                AccessFs::from_read(abi),
            ))
            .map_err(failed)?
            // The program itself, wherever the operator allowed it from.
            .add_rules(path_beneath_rules([program], AccessFs::from_read(abi)))
            .map_err(failed)?
            .add_rules(path_beneath_rules(
                DEVICES,
                AccessFs::ReadFile | AccessFs::WriteFile,
            ))
            .map_err(failed)?
            .add_rules(path_beneath_rules(
                self.data_roots
                    .iter()
                    .map(PathBuf::as_path)
                    .chain([tmpdir.path()]),
                AccessFs::from_all(abi),
            ))
            .map_err(failed)?
            .add_rules(self.net_allow.iter().map(|port| {
                Ok(NetPort::new(
                    *port,
                    AccessNet::BindTcp | AccessNet::ConnectTcp,
                ))
            }))
            .map_err(failed)?;
        let ruleset: Option<OwnedFd> = ruleset.into();
        let ruleset = ruleset.ok_or("Landlock is not available to this worker")?;
        Ok(Prepared {
            ruleset,
            tmpdir,
            limits,
            drop_root: self.drop_root,
            uid: self.run_as.as_ref().map(|u| u.uid.as_raw()),
            gid: self.run_as.as_ref().map(|u| u.gid.as_raw()),
        })
    }
}

impl Prepared {
    /// The command's private TMPDIR (also its HOME).
    pub fn tmpdir(&self) -> &Path {
        self.tmpdir.path()
    }

    /// A hook for `pre_exec`: in the forked child, before the program is executed, applies the
    /// limits, drops root's capabilities, and enters the Landlock domain. Only system calls.
    pub fn enter(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let fd = self.ruleset.as_raw_fd();
        let limits = self.limits;
        let drop_root = self.drop_root;
        move || {
            apply_limits(&limits)?;
            if drop_root {
                drop_capabilities()?;
            }
            // SAFETY: plain system calls on integers; `fd` stays open in the worker (Prepared
            // outlives the spawn) and was inherited by this child.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        }
    }
}

/// The kernel's Landlock ABI version; 0 or less when it has none.
fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the documented version query: no ruleset, size 0.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(version).unwrap_or(0)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `path` with `.` and `..` resolved, and symlinks resolved for the longest prefix that exists.
fn resolve_lexically(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = std::fs::canonicalize(&existing).unwrap_or(existing);
    for part in rest.iter().rev() {
        match part.to_str() {
            Some("..") => {
                resolved.pop();
            }
            Some(".") => {}
            _ => resolved.push(part),
        }
    }
    resolved
}

fn apply_limits(limits: &Limits) -> std::io::Result<()> {
    let set = |resource, value: Option<u64>| -> std::io::Result<()> {
        let Some(value) = value else { return Ok(()) };
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    set(libc::RLIMIT_AS, limits.memory_bytes)?;
    set(libc::RLIMIT_CPU, limits.cpu_seconds)?;
    set(libc::RLIMIT_FSIZE, limits.file_bytes)?;
    set(libc::RLIMIT_NOFILE, limits.open_files)?;
    set(libc::RLIMIT_NPROC, limits.processes)?;
    Ok(())
}

/// Leaves uid 0 with no capability now or after `execve`: the bounding set is emptied (so an
/// exec as root gains nothing), ambient and inheritable sets cleared, then the rest.
fn drop_capabilities() -> std::io::Result<()> {
    // SAFETY: prctl and capset with valid arguments; no allocation.
    unsafe {
        for cap in 0..=63 {
            // Numbers past the kernel's last capability fail with EINVAL: nothing to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        let mut header = Header {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_judged_after_dots_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let sandbox = Sandbox {
            data_roots: vec![root.clone()],
            read_roots: vec![],
            net_allow: vec![],
            tmp_base: std::env::temp_dir(),
            run_as: None,
            drop_root: false,
            limits: Limits::default(),
            abi: 1,
        };
        assert!(sandbox.within_data_roots(&root.join("a/b/out.tif")));
        assert!(sandbox.within_data_roots(&root.join("a/../b")));
        assert!(!sandbox.within_data_roots(&root.join("../etc/shadow")));
        assert!(!sandbox.within_data_roots(Path::new("/etc/shadow")));
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert!(!sandbox.within_data_roots(&root.join("link/shadow")));
    }
}
