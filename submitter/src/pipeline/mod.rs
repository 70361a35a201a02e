//! Pipelines: a TOML file of named stages, each a command run once per item (a file of a glob, a
//! line of a list, or an output of an earlier stage) or once over everything an earlier stage
//! made. `docs/pipelines.md` describes the format; [`Pipeline::parse`] reads and checks it, naming
//! the line and field of any mistake.

pub mod items;
pub mod plan;
pub mod run;
pub mod state;
mod window;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::fanout::check_template;

/// A checked pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// Stages in file order (dependencies always come first once checked).
    pub stages: Vec<Stage>,
    /// Folder the commands run in, on the workers, and that relative paths are resolved from.
    pub workdir: PathBuf,
    /// SHA-256 of the file's text: a resumed run must use the same pipeline.
    pub fingerprint: String,
}

/// Where a stage's items come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Each {
    /// Once, over everything its `needs` made (a barrier stage).
    Once,
    /// One item per file matching a glob (relative to the workdir), expanded when the run starts.
    Glob(String),
    /// One item per non-blank line of a file.
    Lines(PathBuf),
    /// One item per output of each item of an earlier stage, as soon as that item succeeds.
    OutputsOf(String),
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Unique name.
    pub name: String,
    /// Where its items come from.
    pub each: Each,
    /// Stages that must be finished (every item) before any item of this one runs.
    pub needs: Vec<String>,
    /// The command, with placeholders.
    pub command: Vec<String>,
    /// Files each item must create, with placeholders; they feed `<stage>.outputs`.
    pub outputs: Vec<String>,
    /// Task queue (the pool that runs it).
    pub queue: String,
    /// Time limit of one attempt.
    pub timeout_s: Option<f64>,
    /// Environment for the command (values may hold placeholders).
    pub env: BTreeMap<String, String>,
    /// Retries of a failed attempt.
    pub retries: u32,
}

/// A pipeline file's fields, with where they are.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    queue: Option<String>,
    workdir: Option<PathBuf>,
    #[serde(default)]
    stage: Vec<Spanned<StageFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    name: Spanned<String>,
    each: Option<Spanned<String>>,
    #[serde(default)]
    needs: Vec<Spanned<String>>,
    command: Spanned<Vec<String>>,
    #[serde(default)]
    outputs: Vec<Spanned<String>>,
    queue: Option<String>,
    timeout_s: Option<Spanned<f64>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    retries: Option<Spanned<u32>>,
}

/// Placeholder of a barrier command standing for every output of a stage, e.g. `{cog.outputs}`:
/// as a whole argument it becomes one argument per output.
pub fn outputs_placeholder(stage: &str) -> String {
    format!("{{{stage}.outputs}}")
}

impl Pipeline {
    /// Reads and checks a pipeline. `path` names the file in messages and gives the default
    /// workdir (its folder); `default_queue` applies where neither the file nor a stage sets one.
    pub fn parse(text: &str, path: &Path, default_queue: &str) -> Result<Self, String> {
        let source = Source { text, path };
        let file: File = toml::from_str(text).map_err(|e| {
            let place = e
                .span()
                .map(|span| source.at(span))
                .unwrap_or_else(|| path.display().to_string());
            format!("{place}: {}", e.message())
        })?;
        if file.stage.is_empty() {
            return Err(format!(
                "{}: no [[stage]] in the pipeline; see docs/pipelines.md",
                path.display()
            ));
        }
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let workdir = match file.workdir {
            Some(dir) if dir.is_absolute() => dir,
            Some(dir) => base.join(dir),
            None => base.to_path_buf(),
        };
        let workdir = std::path::absolute(&workdir)
            .map_err(|e| format!("{}: workdir {}: {e}", path.display(), workdir.display()))?;
        let queue = file.queue.unwrap_or_else(|| default_queue.to_string());
        let names: BTreeSet<String> = file
            .stage
            .iter()
            .map(|s| s.get_ref().name.get_ref().clone())
            .collect();
        let mut stages = Vec::new();
        let mut seen = BTreeSet::new();
        for spanned in &file.stage {
            stages.push(source.stage(spanned, &names, &mut seen, &queue)?);
        }
        for stage in &stages {
            if let Each::OutputsOf(up) = &stage.each
                && stages
                    .iter()
                    .find(|s| &s.name == up)
                    .is_some_and(|s| s.outputs.is_empty())
            {
                return Err(format!(
                    "{}: stage '{}', each: stage '{up}' declares no outputs to take items from",
                    path.display(),
                    stage.name
                ));
            }
        }
        use sha2::Digest;
        let fingerprint = sha2::Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Pipeline {
            stages,
            workdir,
            fingerprint,
        })
    }

    /// The stage named `name`.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// A pipeline file being read: its text, and its path to name places in messages.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

type Span = std::ops::Range<usize>;

impl Source<'_> {
    /// "FILE line N" for a span of the file.
    fn at(&self, span: Span) -> String {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.lines().count().max(1) + usize::from(before.ends_with('\n'));
        format!("{} line {line}", self.path.display())
    }

    /// Checks one `[[stage]]` against the stages before it (`seen`, which it joins) and all the
    /// stage names of the file.
    // Long: a checklist of one stage's fields, each check with its own message and place in the
    // file.
    fn stage(
        &self,
        spanned: &Spanned<StageFile>,
        names: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        queue: &str,
    ) -> Result<Stage, String> {
        let s = spanned.get_ref();
        let name = s.name.get_ref().clone();
        let here = |span: Span, field: &str, message: String| {
            format!("{}: stage '{name}', {field}: {message}", self.at(span))
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(here(
                s.name.span(),
                "name",
                "use letters, digits, '-' and '_'".into(),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(here(
                s.name.span(),
                "name",
                "two stages have this name".into(),
            ));
        }
        let each = match &s.each {
            None => Each::Once,
            Some(each) => parse_each(each.get_ref(), &name, names, seen)
                .map_err(|m| here(each.span(), "each", m))?,
        };
        let mut needs = Vec::new();
        for need in &s.needs {
            let stage = need.get_ref();
            if !seen.contains(stage) || stage == &name {
                let why = if names.contains(stage) {
                    format!("stage '{stage}' must come before this one")
                } else {
                    format!("there is no stage '{stage}'")
                };
                return Err(here(need.span(), "needs", why));
            }
            needs.push(stage.clone());
        }
        if each == Each::Once && needs.is_empty() {
            return Err(here(
                spanned.span(),
                "each",
                "a stage needs `each` (a glob, \"@list.txt\" or \"<stage>.outputs\") or `needs` (stages to run after, once)".into(),
            ));
        }
        let command = s.command.get_ref();
        if command.is_empty() {
            return Err(here(
                s.command.span(),
                "command",
                "is empty: give the program and its arguments".into(),
            ));
        }
        for arg in command {
            check_arg(arg, &each, &needs).map_err(|m| here(s.command.span(), "command", m))?;
        }
        let mut outputs = Vec::new();
        for output in &s.outputs {
            check_arg(output.get_ref(), &each, &[])
                .map_err(|m| here(output.span(), "outputs", m))?;
            outputs.push(output.get_ref().clone());
        }
        if let Some(t) = &s.timeout_s
            && !(t.get_ref().is_finite() && *t.get_ref() > 0.0)
        {
            return Err(here(
                t.span(),
                "timeout_s",
                "must be a positive number of seconds".into(),
            ));
        }
        if let Some(r) = &s.retries
            && *r.get_ref() > warren_broker::protocol::MAX_RETRIES
        {
            return Err(here(
                r.span(),
                "retries",
                format!("at most {}", warren_broker::protocol::MAX_RETRIES),
            ));
        }
        for value in s.env.values() {
            check_arg(value, &each, &[]).map_err(|m| here(spanned.span(), "env", m))?;
        }
        Ok(Stage {
            name,
            each,
            needs,
            command: command.clone(),
            outputs,
            queue: s.queue.clone().unwrap_or_else(|| queue.to_string()),
            timeout_s: s.timeout_s.as_ref().map(|t| *t.get_ref()),
            env: s.env.clone(),
            retries: s.retries.as_ref().map_or(0, |r| *r.get_ref()),
        })
    }
}

/// A stage's `each`: `<stage>.outputs` of an earlier stage, `@list.txt`, or a glob.
fn parse_each(
    text: &str,
    name: &str,
    names: &BTreeSet<String>,
    seen: &BTreeSet<String>,
) -> Result<Each, String> {
    match text.strip_suffix(".outputs") {
        Some(stage) if names.contains(stage) => {
            if !seen.contains(stage) || stage == name {
                return Err(format!("stage '{stage}' must come before this one"));
            }
            Ok(Each::OutputsOf(stage.to_string()))
        }
        Some(stage) if !text.contains(['*', '?', '[']) => Err(format!(
            "there is no stage '{stage}' (stages: {})",
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        )),
        _ => match text.strip_prefix('@') {
            Some(list) => Ok(Each::Lines(PathBuf::from(list))),
            None if text.trim().is_empty() => Err("is empty".into()),
            None => Ok(Each::Glob(text.to_string())),
        },
    }
}

/// Checks one templated string: item placeholders only where there is an item, and
/// `{<stage>.outputs}` only for a stage in `needs`.
fn check_arg(arg: &str, each: &Each, needs: &[String]) -> Result<(), String> {
    if let Some(stage) = arg
        .strip_prefix('{')
        .and_then(|a| a.strip_suffix(".outputs}"))
    {
        return if needs.iter().any(|n| n == stage) {
            Ok(())
        } else {
            Err(format!(
                "'{arg}' names stage '{stage}', which is not in this stage's `needs`"
            ))
        };
    }
    check_template(arg)?;
    let uses_item = crate::fanout::expand(arg, "a/b.c")? != crate::fanout::expand(arg, "d/e.f")?;
    if *each == Each::Once && uses_item {
        return Err(format!(
            "'{arg}' uses an item placeholder, but this stage runs once (it has no `each`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline, String> {
        Pipeline::parse(text, Path::new("/data/p.toml"), "warren.tasks")
    }

    const GOOD: &str = r#"
queue = "gdal"

[[stage]]
name = "reproject"
each = "raw/*.tif"
command = ["gdalwarp", "{}", "work/{stem}.tif"]
outputs = ["work/{stem}.tif"]
retries = 1

[[stage]]
name = "cog"
each = "reproject.outputs"
command = ["gdal_translate", "-of", "COG", "{}", "cog/{name}"]
outputs = ["cog/{name}"]
queue = "light"

[[stage]]
name = "mosaic"
needs = ["cog"]
command = ["gdalbuildvrt", "mosaic.vrt", "{cog.outputs}"]
outputs = ["mosaic.vrt"]
"#;

    #[test]
    fn a_good_pipeline_reads_with_its_defaults() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.workdir, PathBuf::from("/data"));
        assert_eq!(p.stages.len(), 3);
        assert_eq!(p.stages[0].each, Each::Glob("raw/*.tif".into()));
        assert_eq!(p.stages[0].queue, "gdal");
        assert_eq!(p.stages[1].each, Each::OutputsOf("reproject".into()));
        assert_eq!(p.stages[1].queue, "light");
        assert_eq!(p.stages[2].each, Each::Once);
        assert_eq!(p.stages[2].needs, ["cog"]);
    }

    #[test]
    fn mistakes_are_named_with_line_and_field() {
        let rows = [
            (
                GOOD.replace("reproject.outputs", "reprojct.outputs"),
                "line 13: stage 'cog', each: there is no stage 'reprojct'",
            ),
            (
                GOOD.replace("needs = [\"cog\"]", "needs = [\"cgo\"]"),
                "line 20: stage 'mosaic', needs: there is no stage 'cgo'",
            ),
            (
                GOOD.replace("work/{stem}.tif\"]\nretries", "work/{stme}.tif\"]\nretries"),
                "stage 'reproject', outputs: 'work/{stme}.tif': unknown placeholder {stme}",
            ),
            (
                GOOD.replace("{cog.outputs}", "{reproject.outputs}"),
                "not in this stage's `needs`",
            ),
            (GOOD.replace("retries = 1", "retries = \"x\""), "line 9"),
            (
                GOOD.replace("retries = 1", "retires = 1"),
                "unknown field `retires`",
            ),
            (
                GOOD.replace("\"mosaic.vrt\", \"{cog.outputs}\"", "\"{stem}.vrt\""),
                "runs once",
            ),
            (
                GOOD.replace("name = \"cog\"", "name = \"reproject\""),
                "two stages have this name",
            ),
            (
                "[[stage]]\nname = \"a\"\ncommand = [\"x\"]\n".to_string(),
                "needs `each`",
            ),
            ("x = ".to_string(), "/data/p.toml line 1"),
        ];
        for (text, needle) in rows {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(needle), "want {needle:?} in: {err}");
        }
    }
}
