//! Fan-out: one task per item (a file matched by a glob, or a line of a list), the item put into
//! the task through placeholders: `{}` (the path), `{name}` (file name), `{stem}` (file name
//! without its last extension), `{ext}` (that extension, without the dot), `{dir}` (the folder,
//! `.` for none); `{{` and `}}` are literal braces.

use std::io::BufRead;
use std::path::Path;

use crate::spec::{SpecError, SpecIter, SpecSource, TaskSpec};

/// Puts `item` into `template` (see the module's documentation for the placeholders).
pub fn expand(template: &str, item: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + item.len());
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => {
                            return Err(format!(
                                "'{template}': a '{{' is not closed (write '{{{{' for a literal brace)"
                            ));
                        }
                    }
                }
                out.push_str(&part(&name, item).ok_or_else(|| {
                    format!(
                        "'{template}': unknown placeholder {{{name}}}; use {{}}, {{name}}, {{stem}}, {{ext}} or {{dir}}"
                    )
                })?);
            }
            '}' => {
                return Err(format!(
                    "'{template}': a '}}' without its '{{' (write '}}}}' for a literal brace)"
                ));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Checks a template's placeholders without an item.
pub fn check_template(template: &str) -> Result<(), String> {
    expand(template, "dir/file.ext").map(drop)
}

/// Whether any string of `args` uses a placeholder (two items give different arguments).
pub fn has_placeholder(args: &serde_json::Value) -> bool {
    expand_value(args, "a/b.c").ok() != expand_value(args, "d/e.f").ok()
}

fn part(name: &str, item: &str) -> Option<String> {
    let path = Path::new(item);
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some(match name {
        "" => item.to_string(),
        "name" => file,
        "stem" => path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        "ext" => path
            .extension()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        "dir" => match path.parent().map(|p| p.to_string_lossy().into_owned()) {
            Some(dir) if !dir.is_empty() => dir,
            _ => ".".to_string(),
        },
        _ => return None,
    })
}

/// The files a glob matches, sorted; an error when it matches none (or is not a valid glob).
/// Folders are left out: a task per file.
pub fn glob_items(pattern: &str) -> Result<Vec<String>, String> {
    let paths = glob::glob(pattern).map_err(|e| format!("'{pattern}' is not a valid glob: {e}"))?;
    let mut items = Vec::new();
    for entry in paths {
        let path = entry.map_err(|e| format!("'{pattern}': {e}"))?;
        if path.is_dir() {
            continue;
        }
        items.push(path.to_string_lossy().into_owned());
    }
    if items.is_empty() {
        return Err(format!(
            "'{pattern}' matches no file (relative to {})",
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "the current folder".into())
        ));
    }
    items.sort();
    Ok(items)
}

/// The non-blank lines of `input` (surrounding spaces trimmed), as items; an error when there are
/// none.
pub fn line_items(input: impl BufRead, name: &str) -> Result<Vec<String>, String> {
    let mut items = Vec::new();
    for line in input.lines() {
        let line = line.map_err(|e| format!("cannot read {name}: {e}"))?;
        let item = line.trim();
        if !item.is_empty() {
            items.push(item.to_string());
        }
    }
    if items.is_empty() {
        return Err(format!("{name} holds no item (one per line)"));
    }
    Ok(items)
}

/// A batch made of one task per item from a template task whose `exec` arguments, labels and id
/// may hold placeholders. Each task is labelled `item` with its item.
#[derive(Debug, Clone)]
pub struct FanOut {
    items: Vec<String>,
    template: TaskSpec,
    /// How the items were given, for error messages (`--each 'data/*.tif'`).
    origin: String,
}

impl FanOut {
    /// One task per item of `items`, made from `template`.
    pub fn new(items: Vec<String>, template: TaskSpec, origin: impl Into<String>) -> Self {
        Self {
            items,
            template,
            origin: origin.into(),
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn task(&self, item: &str) -> Result<TaskSpec, String> {
        let mut spec = self.template.clone();
        spec.args = expand_value(&spec.args, item)?;
        for value in spec.labels.values_mut() {
            *value = expand(value, item)?;
        }
        spec.labels
            .entry("item".into())
            .or_insert_with(|| item.to_string());
        if let Some(id) = &spec.id {
            spec.id = Some(expand(id, item)?);
        }
        Ok(spec)
    }
}

/// Expands placeholders in every string of a JSON value (keys stay as they are).
pub fn expand_value(value: &serde_json::Value, item: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    Ok(match value {
        Value::String(s) => Value::String(expand(s, item)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| expand_value(v, item))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), expand_value(v, item)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

impl SpecSource for FanOut {
    fn read(&self) -> Result<SpecIter<'_>, SpecError> {
        Ok(Box::new(self.items.iter().enumerate().map(
            move |(index, item)| {
                let spec = self.task(item).map_err(|message| SpecError {
                    source_name: self.origin.clone(),
                    line: index + 1,
                    message: format!("item '{item}': {message}"),
                })?;
                Ok((index + 1, spec))
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_name_parts_of_the_item() {
        let rows = [
            ("{}", "data/raw/a.b.tif", "data/raw/a.b.tif"),
            ("{name}", "data/raw/a.b.tif", "a.b.tif"),
            (
                "out/{stem}.cog.{ext}",
                "data/raw/a.b.tif",
                "out/a.b.cog.tif",
            ),
            ("{dir}/x", "data/raw/a.tif", "data/raw/x"),
            ("{dir}/x", "a.tif", "./x"),
            ("{ext}", "README", ""),
            ("{{}} {{name}}", "a.tif", "{} {name}"),
            ("no placeholder", "a.tif", "no placeholder"),
        ];
        for (template, item, want) in rows {
            assert_eq!(expand(template, item).unwrap(), want, "{template} {item}");
        }
    }

    #[test]
    fn bad_templates_are_named() {
        for (template, needle) in [
            ("{stme}", "unknown placeholder {stme}"),
            ("{stem", "not closed"),
            ("a}b", "without its"),
        ] {
            let err = check_template(template).unwrap_err();
            assert!(err.contains(needle), "{template}: {err}");
        }
        assert!(has_placeholder(
            &serde_json::json!({"argv": ["x", "out/{stem}.tif"]})
        ));
        assert!(!has_placeholder(
            &serde_json::json!({"argv": ["x", "out/{{stem}}.tif"]})
        ));
    }

    #[test]
    fn a_fan_out_makes_a_task_per_item_with_its_label() {
        let template = TaskSpec {
            id: Some("cog-{stem}".into()),
            ..TaskSpec::exec(vec![
                "gdal_translate".into(),
                "{}".into(),
                "out/{stem}.tif".into(),
            ])
        };
        let fan = FanOut::new(
            vec!["in/a.tif".into(), "in/b.tif".into()],
            template,
            "--each",
        );
        let specs: Vec<TaskSpec> = fan.read().unwrap().map(|r| r.unwrap().1).collect();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].id.as_deref(), Some("cog-b"));
        assert_eq!(
            specs[1].args["argv"],
            serde_json::json!(["gdal_translate", "in/b.tif", "out/b.tif"])
        );
        assert_eq!(specs[0].labels["item"], "in/a.tif");
    }
}
