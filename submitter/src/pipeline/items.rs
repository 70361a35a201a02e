//! A pipeline's items where the runner runs: the first stages' items (a glob or a list), whether
//! an item's outputs are up to date, and what `--dry-run` would run.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use super::plan::{ItemState, ONCE, Plan};
use super::{Each, Pipeline};
use crate::fanout::{glob_items, line_items};

/// The items of the stages that take them from a glob or a list, relative to the workdir.
pub fn root_items(pipeline: &Pipeline) -> Result<Vec<(usize, Vec<String>)>, String> {
    let mut roots = Vec::new();
    for (index, stage) in pipeline.stages.iter().enumerate() {
        let items = match &stage.each {
            Each::Glob(pattern) => {
                let absolute = if Path::new(pattern).is_absolute() {
                    pattern.clone()
                } else {
                    format!(
                        "{}/{pattern}",
                        glob::Pattern::escape(&pipeline.workdir.to_string_lossy())
                    )
                };
                let prefix = format!("{}/", pipeline.workdir.display());
                glob_items(&absolute)
                    .map_err(|e| format!("stage '{}', each: {e}", stage.name))?
                    .into_iter()
                    .map(|p| p.strip_prefix(&prefix).map(str::to_string).unwrap_or(p))
                    .collect()
            }
            Each::Lines(list) => {
                let path = pipeline.workdir.join(list);
                let file = std::fs::File::open(&path).map_err(|e| {
                    format!(
                        "stage '{}', each: cannot open {}: {e}",
                        stage.name,
                        path.display()
                    )
                })?;
                line_items(std::io::BufReader::new(file), &path.display().to_string())
                    .map_err(|e| format!("stage '{}', each: {e}", stage.name))?
            }
            Each::Once | Each::OutputsOf(_) => continue,
        };
        roots.push((index, items));
    }
    Ok(roots)
}

/// Whether every declared output of an item exists and is at least as new as each of its inputs
/// that exists.
pub fn up_to_date(plan: &Plan, stage: usize, item: &str) -> bool {
    let workdir = &plan.pipeline().workdir;
    let outputs = plan.outputs_of(stage, item);
    if outputs.is_empty() {
        return false;
    }
    let modified = |p: &str| {
        std::fs::metadata(workdir.join(p))
            .and_then(|m| m.modified())
            .ok()
    };
    let Some(oldest_output) = outputs
        .iter()
        .map(|o| modified(o))
        .collect::<Option<Vec<SystemTime>>>()
        .and_then(|times| times.into_iter().min())
    else {
        return false;
    };
    let inputs = if plan.pipeline().stages[stage].each == Each::Once && item == ONCE {
        plan.inputs_of(stage, item)
    } else {
        vec![item.to_string()]
    };
    inputs
        .iter()
        .filter_map(|i| modified(i))
        .all(|input| input <= oldest_output)
}

/// What `--dry-run` would run: per stage, the items that are not up to date (items of chained
/// stages are known only where their upstream is up to date or would run).
pub fn dry_run(pipeline: &Pipeline, force: bool) -> Result<Vec<(String, Vec<String>)>, String> {
    let mut plan = Plan::new(pipeline.clone());
    for (stage, items) in root_items(pipeline)? {
        plan.add_items(stage, items);
    }
    let mut would_run: Vec<Vec<String>> = vec![Vec::new(); pipeline.stages.len()];
    // Items whose inputs would be made again: they run whatever their outputs' age.
    let mut stale: HashSet<(usize, String)> = Default::default();
    loop {
        let ready = plan.ready();
        if ready.is_empty() {
            break;
        }
        for (stage, item) in ready {
            let needs_rerun = pipeline.stages[stage].needs.iter().any(|n| {
                pipeline
                    .stages
                    .iter()
                    .position(|s| &s.name == n)
                    .is_some_and(|i| !would_run[i].is_empty())
            });
            if !force
                && !needs_rerun
                && !stale.contains(&(stage, item.clone()))
                && up_to_date(&plan, stage, &item)
            {
                plan.record(stage, &item, ItemState::UpToDate);
                continue;
            }
            let name = &pipeline.stages[stage].name;
            for (taker, s) in pipeline.stages.iter().enumerate() {
                if s.each == Each::OutputsOf(name.clone()) {
                    for output in plan.outputs_of(stage, &item) {
                        stale.insert((taker, output));
                    }
                }
            }
            would_run[stage].push(item.clone());
            plan.record(stage, &item, ItemState::Done);
        }
    }
    Ok(pipeline
        .stages
        .iter()
        .zip(would_run)
        .map(|(s, items)| (s.name.clone(), items))
        .collect())
}
