//! What an `exec` task may run and with which environment. A task is untrusted input: it names
//! a program from the operator's allowlist (resolved to an absolute path once, when the worker
//! starts, with the worker's own PATH) and may set only environment variables that cannot change
//! which code runs. Commands never inherit the worker's environment.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::PathBuf;

use tracing::warn;

use crate::handler::TaskFailure;
use warren_broker::protocol::ErrorKind;

/// Default cap on captured bytes of stdout and of stderr, each.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Variables every command gets from the worker's own environment (when the worker has them).
pub const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TMPDIR"];

/// PATH given to commands (and used to resolve allowed names) when the worker has none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Variables a task may set by default: tuning knobs of GDAL, OpenMP and the math libraries, and
/// the locale. Nothing here names a file or a folder to load code or configuration from; every
/// other name is refused unless the operator allows it with `--allow-task-env`.
pub const DEFAULT_TASK_ENV: [&str; 20] = [
    "GDAL_CACHEMAX",
    "GDAL_NUM_THREADS",
    "GDAL_DISABLE_READDIR_ON_OPEN",
    "GDAL_TIFF_INTERNAL_MASK",
    "GDAL_TIFF_OVR_BLOCKSIZE",
    "GDAL_PAM_ENABLED",
    "GDAL_MAX_DATASET_POOL_SIZE",
    "GDAL_SWATH_SIZE",
    "GDAL_FORCE_CACHING",
    "COMPRESS_OVERVIEW",
    "CPL_DEBUG",
    "OGR_SQLITE_CACHE",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "LANG",
    "LANGUAGE",
    "LC_*",
];

/// Locale variables: their values are looked up as folder names (a message catalog for
/// `LANGUAGE=../../x`), so a value with a `/` is refused even where the name is allowed.
const LOCALE_PREFIXES: [&str; 3] = ["LANG", "LANGUAGE", "LC_"];

/// Whether `pattern` (a name, or a prefix ending in `*`) matches `name`, ignoring case.
fn env_pattern_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.to_ascii_uppercase(), name.to_ascii_uppercase());
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// Which programs may run.
#[derive(Debug, Clone)]
enum Allowed {
    /// `--allow-exec '*'`: any program the task names.
    Any,
    /// Each allowed `argv[0]` as the task must write it, and the absolute path that runs for it
    /// (None when it could not be found when the worker started).
    Programs(BTreeMap<String, Option<PathBuf>>),
}

/// Which programs may run, with which environment, and how much of their output is kept.
#[derive(Debug, Clone)]
pub struct ExecPolicy {
    allowed: Allowed,
    max_output_bytes: usize,
    /// What every command starts with: the base variables and the operator's `--pass-env` ones.
    base_env: Vec<(String, OsString)>,
    /// What tasks may set: [`DEFAULT_TASK_ENV`] and the operator's `--allow-task-env` patterns.
    task_env_allowed: BTreeSet<String>,
    /// The boundary around every command; None runs them unconfined (`--no-sandbox`).
    sandbox: Option<std::sync::Arc<super::Sandbox>>,
}

/// The program an allowed task runs.
#[derive(Debug, PartialEq)]
pub(crate) struct Resolved {
    /// What is executed.
    pub path: PathBuf,
    /// `argv[0]` as the task gave it (multi-call programs look at it).
    pub arg0: String,
}

impl ExecPolicy {
    /// Allows the programs in `allowed`: a bare name (`sha256sum`) allows exactly that `argv[0]`
    /// and runs the program the worker's own PATH finds now; a path allows exactly that path
    /// (made absolute, symlinks resolved, now); `*` allows anything. A program that cannot be
    /// found is logged, and tasks naming it fail with a message saying so.
    pub fn new(allowed: Vec<String>) -> Self {
        let allowed = if allowed.iter().any(|a| a == "*") {
            Allowed::Any
        } else {
            let search_path = worker_path();
            Allowed::Programs(
                allowed
                    .into_iter()
                    .map(|name| {
                        let resolved = resolve(&name, &search_path);
                        if resolved.is_none() {
                            warn!(program = %name, "--allow-exec {name}: no such program on this worker's PATH ({}); tasks naming it will fail", search_path.to_string_lossy());
                        }
                        (name, resolved)
                    })
                    .collect(),
            )
        };
        let base_env = BASE_ENV
            .iter()
            .filter_map(|name| Some((name.to_string(), std::env::var_os(name)?)))
            .collect::<Vec<_>>();
        let mut policy = Self {
            allowed,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            base_env,
            task_env_allowed: DEFAULT_TASK_ENV.iter().map(|p| p.to_string()).collect(),
            sandbox: None,
        };
        if !policy.base_env.iter().any(|(name, _)| name == "PATH") {
            policy
                .base_env
                .push(("PATH".into(), OsString::from(FALLBACK_PATH)));
        }
        policy
    }

    /// Sets the cap on captured stdout and stderr bytes.
    pub fn with_max_output_bytes(mut self, bytes: usize) -> Self {
        self.max_output_bytes = bytes;
        self
    }

    /// Passes the worker's own value of each variable in `names` on to every command (when the
    /// worker has it). Warren's own `WARREN_*` settings carry secrets and are refused.
    pub fn with_pass_env(mut self, names: Vec<String>) -> Result<Self, String> {
        for name in names {
            if name.to_ascii_uppercase().starts_with("WARREN_") {
                return Err(format!(
                    "--pass-env {name}: Warren's own settings (WARREN_*) hold the broker's credentials and are never passed to commands"
                ));
            }
            if let Some(value) = std::env::var_os(&name) {
                self.base_env.retain(|(n, _)| *n != name);
                self.base_env.push((name, value));
            }
        }
        Ok(self)
    }

    /// Lets tasks set the variables these patterns match, beside [`DEFAULT_TASK_ENV`]: a name
    /// (`PYTHONPATH`) or a prefix ending in `*` (`GDAL_*`). `WARREN_*` can never be allowed.
    pub fn with_task_env_allowed(mut self, patterns: Vec<String>) -> Result<Self, String> {
        for pattern in patterns {
            let upper = pattern.to_ascii_uppercase();
            let prefix = upper.trim_end_matches('*');
            if upper == "*" || "WARREN_".starts_with(prefix) || prefix.starts_with("WARREN_") {
                return Err(format!(
                    "--allow-task-env {pattern}: tasks may never set Warren's own settings (WARREN_*)"
                ));
            }
            if prefix.is_empty()
                || prefix.contains(['=', '\0'])
                || upper[..prefix.len()].contains('*')
            {
                return Err(format!(
                    "--allow-task-env {pattern}: give a variable name, or a prefix ending in '*' (GDAL_*)"
                ));
            }
            self.task_env_allowed.insert(upper);
        }
        Ok(self)
    }

    /// Whether a task may set `name` to `value`.
    fn task_may_set(&self, name: &str, value: &str) -> bool {
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("WARREN_") {
            return false;
        }
        if LOCALE_PREFIXES.iter().any(|p| upper.starts_with(p)) && value.contains('/') {
            return false;
        }
        self.task_env_allowed
            .iter()
            .any(|pattern| env_pattern_matches(pattern, name))
    }

    /// Confines every command to `sandbox` (see [`super::Sandbox`]).
    pub fn with_sandbox(mut self, sandbox: super::Sandbox) -> Self {
        self.sandbox = Some(std::sync::Arc::new(sandbox));
        self
    }

    /// The sandbox commands run in, if any.
    pub fn sandbox(&self) -> Option<&super::Sandbox> {
        self.sandbox.as_deref()
    }

    /// The cap on captured stdout and stderr bytes, each.
    pub fn max_output_bytes(&self) -> usize {
        self.max_output_bytes
    }

    /// Whether `program` (an `argv[0]`) may run.
    pub fn allows(&self, program: &str) -> bool {
        match &self.allowed {
            Allowed::Any => true,
            Allowed::Programs(programs) => programs.contains_key(program),
        }
    }

    /// The program to execute for a task's `argv[0]`, or why it may not run.
    pub(crate) fn resolve(&self, program: &str) -> Result<Resolved, TaskFailure> {
        let path = match &self.allowed {
            Allowed::Any if program.contains('/') => Some(PathBuf::from(program)),
            Allowed::Any => resolve(program, &self.command_path()),
            Allowed::Programs(programs) => match programs.get(program) {
                Some(path) => path.clone(),
                None => {
                    return Err(TaskFailure::of(
                        ErrorKind::NotAllowed,
                        format!(
                            "program '{program}' is not allowed on this worker; start the worker with \
                             --allow-exec {program} (or --allow-exec '*' to allow any program)"
                        ),
                    ));
                }
            },
        };
        let path = path.ok_or_else(|| {
            TaskFailure::of(
                ErrorKind::SpawnFailed,
                format!(
                    "cannot start '{program}': not found on the worker's PATH ({}); install it \
                     on the worker or give its full path",
                    self.command_path().to_string_lossy()
                ),
            )
        })?;
        Ok(Resolved {
            path,
            arg0: program.to_string(),
        })
    }

    /// The whole environment of a command: the base, then the task's variables, each checked.
    pub(crate) fn command_env(
        &self,
        task_env: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, OsString)>, TaskFailure> {
        let mut env = self.base_env.clone();
        for (name, value) in task_env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(TaskFailure::of(
                    ErrorKind::InvalidArgs,
                    format!(
                        "env variable {name:?} is not valid: names may not be empty or hold '=' or NUL, values may not hold NUL"
                    ),
                ));
            }
            if !self.task_may_set(name, value) {
                return Err(TaskFailure::of(
                    ErrorKind::EnvNotAllowed,
                    format!(
                        "a task may not set {name}{}: tasks may set only the variables the worker \
                         allows (GDAL, OpenMP and math-library tuning, the locale; see \
                         `warren worker --help`). If this pipeline needs it, start the worker with \
                         --allow-task-env {name}",
                        if value.contains('/') {
                            " to a path"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            env.retain(|(n, _)| n != name);
            env.push((name.clone(), OsString::from(value)));
        }
        Ok(env)
    }

    fn command_path(&self) -> OsString {
        self.base_env
            .iter()
            .find(|(name, _)| name == "PATH")
            .map_or_else(|| OsString::from(FALLBACK_PATH), |(_, v)| v.clone())
    }
}

fn worker_path() -> OsString {
    std::env::var_os("PATH").unwrap_or_else(|| OsString::from(FALLBACK_PATH))
}

/// An absolute, symlink-free path for `program`: looked up on `search_path` when it is a bare
/// name, made absolute against the worker's directory when it is a path.
fn resolve(program: &str, search_path: &OsString) -> Option<PathBuf> {
    let found = if program.contains('/') {
        PathBuf::from(program)
    } else {
        let cwd = std::env::current_dir().ok()?;
        which::which_in(program, Some(search_path), cwd).ok()?
    };
    std::fs::canonicalize(found).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_resolve_to_absolute_paths_now() {
        let policy = ExecPolicy::new(vec!["sh".into(), "no-such-program-xyz".into()]);
        let sh = policy.resolve("sh").unwrap();
        assert!(sh.path.is_absolute(), "{sh:?}");
        assert_eq!(sh.arg0, "sh");
        let missing = policy.resolve("no-such-program-xyz").unwrap_err();
        assert_eq!(missing.error.kind, "spawn_failed");
        assert!(
            missing
                .error
                .message
                .contains("not found on the worker's PATH")
        );
        for other in ["./sh", "/tmp/sh", "bash", "SH", "sh "] {
            let err = policy.resolve(other).unwrap_err();
            assert_eq!(err.error.kind, "not_allowed", "{other}");
        }
    }

    #[test]
    fn task_variables_are_allowed_by_name_and_everything_else_is_refused() {
        let policy = ExecPolicy::new(vec!["*".into()]);
        for name in [
            "GDAL_CONFIG_FILE",
            "GDAL_VRT_ENABLE_PYTHON",
            "OPENSSL_CONF",
            "OPENSSL_MODULES",
            "XDG_CONFIG_HOME",
            "PYENV_HOOK_PATH",
            "GLIBC_TUNABLES",
            "MALLOC_ARENA_MAX",
            "TZ",
            "TZDIR",
            "LUA_INIT",
            "TCLLIBPATH",
            "ZDOTDIR",
            "GDAL_DATA",
            "PROJ_DATA",
            "SSL_CERT_DIR",
            "CURL_CA_BUNDLE",
            "TERMINFO",
            "PATH",
            "path",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "ENV",
            "IFS",
            "PYTHONPATH",
            "PYTHONSTARTUP",
            "BASH_FUNC_sha256sum%%",
            "WARREN_AMQP_URL",
            "GDAL_DRIVER_PATH",
            "HOME",
        ] {
            let env = BTreeMap::from([(name.to_string(), "x".to_string())]);
            let err = policy.command_env(&env).unwrap_err();
            assert_eq!(err.error.kind, "env_not_allowed", "{name}");
            assert!(err.error.message.contains(name), "{}", err.error.message);
        }
        let ok = BTreeMap::from([
            ("GDAL_CACHEMAX".to_string(), "512".to_string()),
            ("gdal_num_threads".to_string(), "2".to_string()),
            ("LC_ALL".to_string(), "C.UTF-8".to_string()),
            ("LANGUAGE".to_string(), "de:en".to_string()),
        ]);
        assert!(policy.command_env(&ok).is_ok());
        // A locale that is a path would load a message catalog from anywhere.
        for (name, value) in [("LANGUAGE", "../../../tmp/x"), ("LC_MESSAGES", "/tmp/x")] {
            let env = BTreeMap::from([(name.to_string(), value.to_string())]);
            let err = policy.command_env(&env).unwrap_err();
            assert_eq!(err.error.kind, "env_not_allowed", "{name}");
        }
        let prefixed = ExecPolicy::new(vec!["*".into()])
            .with_task_env_allowed(vec!["AWS_*".into()])
            .unwrap();
        let env = BTreeMap::from([("AWS_REGION".to_string(), "eu".to_string())]);
        assert!(prefixed.command_env(&env).is_ok());
        for bad in ["*", "WARREN_*", "WAR*", "W*", "A*B"] {
            assert!(
                ExecPolicy::new(vec![])
                    .with_task_env_allowed(vec![bad.into()])
                    .is_err(),
                "{bad}"
            );
        }
        let opted = policy
            .with_task_env_allowed(vec!["PYTHONPATH".into()])
            .unwrap();
        let env = BTreeMap::from([("PYTHONPATH".to_string(), "/opt/lib".to_string())]);
        assert!(opted.command_env(&env).is_ok());
        assert!(
            opted
                .with_task_env_allowed(vec!["WARREN_X".into()])
                .is_err()
        );
    }

    #[test]
    fn the_base_environment_holds_no_worker_secrets() {
        let policy = ExecPolicy::new(vec!["*".into()]);
        let env = policy.command_env(&BTreeMap::new()).unwrap();
        let names: Vec<_> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.iter().all(|n| BASE_ENV.contains(n)), "{names:?}");
        assert!(names.contains(&"PATH"));
        assert!(
            ExecPolicy::new(vec![])
                .with_pass_env(vec!["WARREN_AMQP_URL".into()])
                .is_err()
        );
    }

    #[test]
    fn malformed_variable_names_are_rejected() {
        let policy = ExecPolicy::new(vec!["*".into()]);
        for name in ["", "A=B", "A\0"] {
            let env = BTreeMap::from([(name.to_string(), "x".to_string())]);
            assert_eq!(
                policy.command_env(&env).unwrap_err().error.kind,
                "invalid_args"
            );
        }
    }
}
