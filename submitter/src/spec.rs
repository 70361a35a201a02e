//! Task lines: the JSON a user or script writes to describe one task, and their validation.

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use warren_broker::protocol::{
    ExecArgs, check_builtin_args, parse_time, validate_id, validate_retries,
};

/// One task as submitted: a JSON object per line of a tasks file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Handler name: `exec`, `echo`, `sleep`, or one of a custom worker's.
    pub kind: String,
    /// Arguments for the handler.
    #[serde(default)]
    pub args: Value,
    /// Time limit of one attempt, in seconds.
    #[serde(default)]
    pub timeout_s: Option<f64>,
    /// Task id; generated when absent. Must be unique within the batch.
    #[serde(default)]
    pub id: Option<String>,
    /// Free-form labels, copied to the result.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How often a failed or timed-out attempt is tried again (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Seconds before the first retry (default 1), doubled for each further one, with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff_s: Option<f64>,
    /// After this time (RFC 3339) the task is not run: it gets an `expired` result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// A task line that cannot be used, with where it is.
#[derive(Debug, thiserror::Error)]
#[error("{source_name} line {line}: {message}")]
pub struct SpecError {
    /// File name, or `stdin`.
    pub source_name: String,
    /// 1-based line number (0 when the problem is the input as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl TaskSpec {
    /// An `exec` task running `argv`.
    pub fn exec(argv: Vec<String>) -> Self {
        Self::from_exec(&ExecArgs {
            argv,
            ..ExecArgs::default()
        })
    }

    /// An `exec` task with these arguments.
    pub fn from_exec(args: &ExecArgs) -> Self {
        Self {
            kind: "exec".into(),
            // Plain strings, paths and maps: always representable as JSON.
            args: serde_json::to_value(args).unwrap_or_default(),
            ..Self::default()
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.kind.trim().is_empty() {
            return Err("\"kind\" is empty".into());
        }
        if let Some(id) = &self.id {
            validate_id("id", id).map_err(|e| e.to_string())?;
        }
        if let Some(t) = self.timeout_s
            && !(t.is_finite() && t > 0.0)
        {
            return Err(format!(
                "\"timeout_s\" must be a positive number of seconds, got {t}"
            ));
        }
        validate_retries(self.max_retries, self.retry_backoff_s)?;
        if let Some(at) = &self.expires_at {
            parse_time("\"expires_at\"", at)?;
        }
        // What a worker would refuse with `invalid_args` is refused here, before anything is sent.
        check_builtin_args(&self.kind, &self.args)
            .map_err(|e| format!("a '{}' task's {e}", self.kind))
    }
}

/// The task lines of `input`, read one at a time: blank lines and lines starting with `#` are
/// skipped, and each task is checked as it is read. Items are `(line number, task)`.
pub struct SpecLines<R> {
    lines: std::io::Lines<R>,
    source_name: String,
    number: usize,
}

impl<R: BufRead> SpecLines<R> {
    /// Reads `input`, naming it `source_name` in errors.
    pub fn new(input: R, source_name: &str) -> Self {
        Self {
            lines: input.lines(),
            source_name: source_name.to_string(),
            number: 0,
        }
    }

    fn error(&self, message: String) -> SpecError {
        SpecError {
            source_name: self.source_name.clone(),
            line: self.number,
            message,
        }
    }
}

impl<R: BufRead> Iterator for SpecLines<R> {
    type Item = Result<(usize, TaskSpec), SpecError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = self.lines.next()?;
            self.number += 1;
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(Err(self.error(format!("cannot read: {e}")))),
            };
            let text = line.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let spec: TaskSpec = match serde_json::from_str(text) {
                Ok(spec) => spec,
                Err(e) => {
                    return Some(Err(self.error(format!(
                        "not a valid task ({e}); expected {{\"kind\": \"exec\", \"args\": {{\"argv\": [...]}}}}"
                    ))));
                }
            };
            return Some(match spec.check() {
                Ok(()) => Ok((self.number, spec)),
                Err(message) => Err(self.error(message)),
            });
        }
    }
}

/// Finds task ids used twice in a batch, in memory that does not grow with the ids' length: it
/// keeps a 64-bit hash of each id (a batch of a million tasks with ids: about 16 MB), so two
/// different ids are taken for one with a probability below 1 in 10^7 at a million ids.
#[derive(Default)]
pub struct DuplicateIds {
    seen: std::collections::HashSet<u64>,
}

impl DuplicateIds {
    /// Records `id`; false when it (or an id with the same hash) was recorded before.
    pub fn insert(&mut self, id: &str) -> bool {
        use std::hash::{BuildHasher, BuildHasherDefault};
        // A fixed hasher: the same id always hashes alike, and ids are not adversarial here (a
        // submitter checks its own file).
        let hash =
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id);
        self.seen.insert(hash)
    }
}

/// Where a batch's tasks come from. A source is read more than once (a checking pass, then each
/// publishing pass), so a batch is never held in memory whole.
pub trait SpecSource: Sync {
    /// The tasks from the start, each with its line number (its position, for a list).
    fn read(&self) -> Result<SpecIter<'_>, SpecError>;
}

/// The tasks of a [`SpecSource`], in order.
pub type SpecIter<'a> = Box<dyn Iterator<Item = Result<(usize, TaskSpec), SpecError>> + Send + 'a>;

impl SpecSource for [TaskSpec] {
    fn read(&self) -> Result<SpecIter<'_>, SpecError> {
        Ok(Box::new(
            self.iter()
                .enumerate()
                .map(|(index, spec)| Ok((index + 1, spec.clone()))),
        ))
    }
}

impl SpecSource for Vec<TaskSpec> {
    fn read(&self) -> Result<SpecIter<'_>, SpecError> {
        self.as_slice().read()
    }
}

/// A JSON-lines task file, read from disk on each pass.
pub struct TaskFile {
    path: std::path::PathBuf,
    name: String,
}

impl TaskFile {
    /// The task file at `path`, called `name` in error messages.
    pub fn new(path: impl Into<std::path::PathBuf>, name: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            name: name.into(),
        }
    }
}

impl SpecSource for TaskFile {
    fn read(&self) -> Result<SpecIter<'_>, SpecError> {
        let file = std::fs::File::open(&self.path).map_err(|e| SpecError {
            source_name: self.name.clone(),
            line: 0,
            message: format!("cannot open task file {}: {e}", self.path.display()),
        })?;
        Ok(Box::new(SpecLines::new(
            std::io::BufReader::with_capacity(256 * 1024, file),
            &self.name,
        )))
    }
}

/// Reads every task line of `input` into memory and checks them all (ids used twice included).
/// For batches of any size, give a [`SpecSource`] to the submitter instead.
pub fn read_specs(input: impl BufRead, source_name: &str) -> Result<Vec<TaskSpec>, SpecError> {
    let mut specs = Vec::new();
    let mut ids = DuplicateIds::default();
    for item in SpecLines::new(input, source_name) {
        let (line, spec) = item?;
        if let Some(id) = &spec.id
            && !ids.insert(id)
        {
            return Err(SpecError {
                source_name: source_name.to_string(),
                line,
                message: format!("task id '{id}' is used twice in this batch"),
            });
        }
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err(SpecError {
            source_name: source_name.to_string(),
            line: 0,
            message: "no tasks found (expected one JSON object per line)".into(),
        });
    }
    if u32::try_from(specs.len()).is_err() {
        return Err(SpecError {
            source_name: source_name.to_string(),
            line: 0,
            message: "too many tasks for one batch".into(),
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<TaskSpec>, SpecError> {
        read_specs(text.as_bytes(), "tasks.jsonl")
    }

    #[test]
    fn reads_lines_skipping_blanks_and_comments() {
        let specs = read("# comment\n{\"kind\":\"echo\",\"args\":{\"x\":1}}\n\n{\"kind\":\"sleep\",\"args\":{\"ms\":5},\"id\":\"a\",\"timeout_s\":2}\n").unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].id.as_deref(), Some("a"));
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let err = read("{\"kind\":\"echo\"}\n{\"kind\":\"echo\",\"argz\":1}\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.to_string().contains("argz"), "{err}");
        let err = read("{\"kind\":\"echo\"}\nnot json\n").unwrap_err();
        assert!(err.to_string().starts_with("tasks.jsonl line 2:"), "{err}");
        let err = read("{\"kind\":\"echo\",\"timeout_s\":0}\n").unwrap_err();
        assert!(err.message.contains("timeout_s"), "{err}");
    }

    #[test]
    fn duplicate_ids_and_empty_input_are_refused() {
        let err = read("{\"kind\":\"echo\",\"id\":\"x\"}\n{\"kind\":\"echo\",\"id\":\"x\"}\n")
            .unwrap_err();
        assert!(err.message.contains("used twice"), "{err}");
        assert!(
            read("\n# nothing\n")
                .unwrap_err()
                .message
                .contains("no tasks")
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a task file holds, reading it gives tasks or an error naming a line; no panic.
        #[test]
        fn any_text_is_read_or_refused_with_a_line(text in "(\\PC|\n|\\{|\\}|\"|:|,){0,300}") {
            match read_specs(text.as_bytes(), "f") {
                Ok(specs) => prop_assert!(specs.iter().all(|s| !s.kind.trim().is_empty())),
                // Line 0 names the input as a whole (e.g. no task in it).
                Err(e) => prop_assert!(!e.message.is_empty() && e.line <= text.lines().count()),
            }
        }

        /// Lines written from valid tasks read back as the same tasks.
        #[test]
        fn valid_lines_read_back(kinds in proptest::collection::vec("[a-z]{1,10}", 1..20),
                                 timeout in proptest::option::of(0.001f64..1e5)) {
            let text: String = kinds
                .iter()
                .map(|k| format!("{}\n", serde_json::json!({"kind": k, "args": {"k": k}, "timeout_s": timeout})))
                .collect();
            let specs = read_specs(text.as_bytes(), "f").unwrap();
            prop_assert_eq!(specs.len(), kinds.len());
            for (spec, kind) in specs.iter().zip(&kinds) {
                prop_assert_eq!(&spec.kind, kind);
                prop_assert_eq!(spec.timeout_s, timeout);
            }
        }
    }
}
