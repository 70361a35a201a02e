//! The pure core of a run: which items each stage has, which are ready, and what an outcome
//! changes downstream. No I/O: the runner feeds it items and outcomes and asks what to submit.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Each, Pipeline, Stage, outputs_placeholder};
use crate::fanout::expand;
use crate::spec::TaskSpec;

/// Where an item is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum ItemState {
    /// Not submitted yet (its inputs or its `needs` are not ready, or it is next).
    Waiting,
    /// Submitted; its result is awaited.
    Submitted,
    /// Succeeded.
    Done,
    /// Its declared outputs were newer than its inputs: not run, counts as done.
    UpToDate,
    /// Did not succeed (the error kind).
    Failed(String),
    /// Not run because something it depends on failed.
    Skipped,
}

impl ItemState {
    /// Whether the item will not change any more.
    pub fn is_final(&self) -> bool {
        !matches!(self, ItemState::Waiting | ItemState::Submitted)
    }

    /// Whether its outputs exist for what comes after.
    pub fn succeeded(&self) -> bool {
        matches!(self, ItemState::Done | ItemState::UpToDate)
    }

    /// Whether a run's state records this state: waiting and skipped items are derived again
    /// from the pipeline and the recorded outcomes.
    pub fn is_recorded(&self) -> bool {
        !matches!(self, ItemState::Waiting | ItemState::Skipped)
    }
}

/// The item of a stage that runs once.
pub const ONCE: &str = "(once)";

/// Counts of a stage's items, for progress and `warren status --run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCounts {
    /// Items known so far.
    pub known: u64,
    /// Whether every item is known (a chained stage learns its items as its upstream runs).
    pub all_known: bool,
    /// Waiting to be submitted.
    pub waiting: u64,
    /// Submitted, result awaited (queued ones included).
    pub running: u64,
    /// Of `running`, how many wait in their task queue for a worker, as the runner last read
    /// the queue from the broker (0 where unknown).
    #[serde(default)]
    pub queued: u64,
    /// Succeeded.
    pub done: u64,
    /// Up to date, not run.
    pub up_to_date: u64,
    /// Did not succeed.
    pub failed: u64,
    /// Not run because an input failed.
    pub skipped: u64,
}

impl StageCounts {
    /// The count of items in `state`.
    fn of(&mut self, state: &ItemState) -> &mut u64 {
        match state {
            ItemState::Waiting => &mut self.waiting,
            ItemState::Submitted => &mut self.running,
            ItemState::Done => &mut self.done,
            ItemState::UpToDate => &mut self.up_to_date,
            ItemState::Failed(_) => &mut self.failed,
            ItemState::Skipped => &mut self.skipped,
        }
    }
}

/// Every stage's items and their states.
#[derive(Debug, Clone)]
pub struct Plan {
    pipeline: Pipeline,
    items: Vec<BTreeMap<String, ItemState>>,
    /// Per stage, its items in [`ItemState::Waiting`]: what may be submitted, found without a
    /// scan of every item (a run may have 100,000s).
    waiting: Vec<BTreeSet<String>>,
    /// Per stage, how many items are in each state, kept up to date by [`Plan::set`].
    counts: Vec<StageCounts>,
    /// Changes to recorded states (see [`ItemState::is_recorded`]) since the last
    /// [`Plan::take_changes`], when tracked: what a run's next checkpoint must add.
    changes: Option<Vec<(usize, String, ItemState)>>,
    /// Stages whose items are all known.
    all_known: Vec<bool>,
    /// Every chained stage waits for the whole of its upstream (for comparisons).
    barriers: bool,
    /// Why items failed in this session (the last lines of their stderr, or the error), for the
    /// first [`KEPT_FAILURES`] failures.
    failures: BTreeMap<(usize, String), String>,
}

/// Failures whose reason a plan keeps.
pub const KEPT_FAILURES: usize = 50;

impl Plan {
    /// A plan for `pipeline` with no items yet; give the first stages theirs with [`Plan::add_items`].
    pub fn new(pipeline: Pipeline) -> Self {
        let n = pipeline.stages.len();
        let mut plan = Self {
            items: vec![BTreeMap::new(); n],
            waiting: vec![BTreeSet::new(); n],
            counts: vec![StageCounts::default(); n],
            changes: None,
            all_known: vec![false; n],
            barriers: false,
            failures: BTreeMap::new(),
            pipeline,
        };
        for index in 0..n {
            if plan.pipeline.stages[index].each == Each::Once {
                plan.set(index, ONCE, ItemState::Waiting);
                plan.all_known[index] = true;
            }
        }
        plan
    }

    /// Makes every chained stage wait until its upstream stage is finished, as with a barrier
    /// between stages (for comparisons with per-item chaining).
    pub fn set_barriers(&mut self, barriers: bool) {
        self.barriers = barriers;
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Gives a stage whose items come from a glob or a list all of them.
    pub fn add_items(&mut self, stage: usize, items: impl IntoIterator<Item = String>) {
        for item in items {
            if !self.items[stage].contains_key(&item) {
                self.set(stage, &item, ItemState::Waiting);
            }
        }
        self.all_known[stage] = true;
        self.settle();
    }

    /// The state of an item, if the stage has it.
    pub fn state(&self, stage: usize, item: &str) -> Option<&ItemState> {
        self.items[stage].get(item)
    }

    /// Every item of a stage with its state.
    pub fn items(&self, stage: usize) -> &BTreeMap<String, ItemState> {
        &self.items[stage]
    }

    /// Keeps why `item` of `stage` failed (bounded to [`KEPT_FAILURES`] items).
    pub fn note_failure(&mut self, stage: usize, item: &str, why: String) {
        if self.failures.len() < KEPT_FAILURES {
            self.failures.insert((stage, item.to_string()), why);
        }
    }

    /// Why `item` of `stage` failed, when this session saw it.
    pub fn failure(&self, stage: usize, item: &str) -> Option<&str> {
        self.failures
            .get(&(stage, item.to_string()))
            .map(String::as_str)
    }

    /// Whether every item of `stage` is known and final.
    pub fn finished(&self, stage: usize) -> bool {
        let c = &self.counts[stage];
        self.all_known[stage] && c.waiting == 0 && c.running == 0
    }

    /// Whether every stage is finished.
    pub fn complete(&self) -> bool {
        (0..self.items.len()).all(|s| self.finished(s))
    }

    /// Items that may be submitted now, later stages first (so files travel through the whole
    /// pipeline early instead of waiting behind every file's first step).
    pub fn ready(&self) -> Vec<(usize, String)> {
        self.ready_stages()
            .into_iter()
            .flat_map(|stage| self.waiting[stage].iter().map(move |i| (stage, i.clone())))
            .collect()
    }

    /// The stages whose waiting items may be submitted now, later stages first.
    pub fn ready_stages(&self) -> Vec<usize> {
        (0..self.pipeline.stages.len())
            .rev()
            .filter(|&index| {
                let stage = &self.pipeline.stages[index];
                if !stage.needs.iter().all(|n| self.finished(self.index(n))) {
                    return false;
                }
                !matches!(&stage.each, Each::OutputsOf(up)
                    if self.barriers && !self.finished(self.index(up)))
            })
            .collect()
    }

    /// At most `limit` waiting items of `stage`, in order.
    pub fn waiting_items(&self, stage: usize, limit: usize) -> Vec<String> {
        self.waiting[stage].iter().take(limit).cloned().collect()
    }

    /// Starts keeping the changes a run's checkpoint records (see [`Plan::take_changes`]).
    pub fn track_changes(&mut self) {
        self.changes = Some(Vec::new());
    }

    /// The changes to recorded states since the last call (empty unless tracked).
    pub fn take_changes(&mut self) -> Vec<(usize, String, ItemState)> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Sets an item's state, keeping the counts, the waiting sets and the change log in step:
    /// every state change goes through here.
    fn set(&mut self, stage: usize, item: &str, state: ItemState) {
        if let Some(changes) = &mut self.changes
            && state.is_recorded()
        {
            changes.push((stage, item.to_string(), state.clone()));
        }
        let counts = &mut self.counts[stage];
        *counts.of(&state) += 1;
        if state == ItemState::Waiting {
            self.waiting[stage].insert(item.to_string());
        }
        match self.items[stage].insert(item.to_string(), state) {
            Some(previous) => {
                *counts.of(&previous) -= 1;
                if previous == ItemState::Waiting {
                    self.waiting[stage].remove(item);
                }
            }
            None => counts.known += 1,
        }
    }

    /// Records that an item was submitted.
    pub fn submitted(&mut self, stage: usize, item: &str) {
        if self.items[stage].get(item) == Some(&ItemState::Waiting) {
            self.set(stage, item, ItemState::Submitted);
        }
    }

    /// Takes back submissions the broker did not confirm: each item still submitted waits
    /// again, and the change log forgets it was submitted (no checkpoint recorded it:
    /// checkpoints await confirms). One pass over the log, however many are taken back.
    pub fn unsubmit(&mut self, items: &[(usize, String)]) {
        let taken: HashSet<(usize, &str)> = items
            .iter()
            .filter(|(stage, item)| self.items[*stage].get(item) == Some(&ItemState::Submitted))
            .map(|(stage, item)| (*stage, item.as_str()))
            .collect();
        if taken.is_empty() {
            return;
        }
        if let Some(changes) = &mut self.changes {
            changes.retain(|(stage, item, state)| {
                !(*state == ItemState::Submitted && taken.contains(&(*stage, item.as_str())))
            });
        }
        for (stage, item) in taken {
            self.set(stage, item, ItemState::Waiting);
        }
    }

    /// Records an item's outcome; the first outcome of an item counts (results come at least
    /// once). Its outputs become items of the stages that take them, or, when it failed, those
    /// items are skipped.
    pub fn record(&mut self, stage: usize, item: &str, outcome: ItemState) {
        if self.items[stage].get(item).is_some_and(ItemState::is_final) {
            return;
        }
        let succeeded = outcome.succeeded();
        self.set(stage, item, outcome);
        let outputs = self.outputs_of(stage, item);
        let name = self.pipeline.stages[stage].name.clone();
        let takers: Vec<usize> = (0..self.pipeline.stages.len())
            .filter(|i| self.pipeline.stages[*i].each == Each::OutputsOf(name.clone()))
            .collect();
        for index in takers {
            {
                for output in &outputs {
                    let state = if succeeded {
                        ItemState::Waiting
                    } else {
                        ItemState::Skipped
                    };
                    let before = self.items[index].get(output).cloned();
                    if before.as_ref().is_none_or(|b| !b.is_final()) {
                        if !succeeded {
                            self.record(index, output, state);
                        } else if before.is_none() {
                            self.set(index, output, state);
                        }
                    }
                }
            }
        }
        self.settle();
    }

    /// Marks chained stages whose upstream is finished as fully known, and skips stages that run
    /// once when something they need failed.
    fn settle(&mut self) {
        loop {
            let mut changed = false;
            for index in 0..self.items.len() {
                let stage = &self.pipeline.stages[index];
                if let Each::OutputsOf(up) = &stage.each
                    && !self.all_known[index]
                    && self.finished(self.index(up))
                {
                    self.all_known[index] = true;
                    changed = true;
                }
                let needs_failed = stage.needs.iter().any(|n| {
                    let i = self.index(n);
                    self.finished(i) && self.counts[i].failed + self.counts[i].skipped > 0
                });
                if needs_failed {
                    for item in std::mem::take(&mut self.waiting[index]) {
                        self.set(index, &item, ItemState::Skipped);
                        changed = true;
                    }
                }
            }
            if !changed {
                return;
            }
        }
    }

    fn index(&self, name: &str) -> usize {
        self.pipeline
            .stages
            .iter()
            .position(|s| s.name == name)
            .unwrap_or(usize::MAX)
    }

    /// The files an item of `stage` declares it makes (relative to the workdir).
    pub fn outputs_of(&self, stage: usize, item: &str) -> Vec<String> {
        self.pipeline.stages[stage]
            .outputs
            .iter()
            .filter_map(|o| expand(o, item).ok())
            .collect()
    }

    /// The files an item reads: the item itself, or for a stage that runs once every output of
    /// what it needs.
    pub fn inputs_of(&self, stage: usize, item: &str) -> Vec<String> {
        let s = &self.pipeline.stages[stage];
        if s.each == Each::Once {
            s.needs
                .iter()
                .flat_map(|n| self.all_outputs(self.index(n)))
                .collect()
        } else {
            vec![item.to_string()]
        }
    }

    /// Every output of a stage's succeeded items, sorted.
    pub fn all_outputs(&self, stage: usize) -> Vec<String> {
        let Some(items) = self.items.get(stage) else {
            return Vec::new();
        };
        let mut all: Vec<String> = items
            .iter()
            .filter(|(_, s)| s.succeeded())
            .flat_map(|(item, _)| self.outputs_of(stage, item))
            .collect();
        all.sort();
        all
    }

    /// The task that runs `item` of `stage`, labelled with the run, stage and item.
    pub fn task(&self, run: &str, stage: usize, item: &str) -> Result<TaskSpec, String> {
        let s = &self.pipeline.stages[stage];
        let mut argv = Vec::new();
        for arg in &s.command {
            match self.needed_outputs(s, arg) {
                Some(outputs) => argv.extend(outputs),
                None => argv.push(expand(arg, item)?),
            }
        }
        let env: BTreeMap<String, String> = s
            .env
            .iter()
            .map(|(k, v)| Ok((k.clone(), expand(v, item)?)))
            .collect::<Result<_, String>>()?;
        let outputs: Vec<String> = self.outputs_of(stage, item);
        let mut args = json!({
            "argv": argv,
            "cwd": self.pipeline.workdir,
        });
        if !env.is_empty() {
            args["env"] = json!(env);
        }
        if !outputs.is_empty() {
            args["outputs"] = json!(outputs);
        }
        Ok(TaskSpec {
            kind: "exec".into(),
            args,
            timeout_s: s.timeout_s,
            id: Some(task_id(&s.name, item)),
            labels: BTreeMap::from([
                ("run".to_string(), run.to_string()),
                ("stage".to_string(), s.name.clone()),
                ("item".to_string(), item.to_string()),
            ]),
            max_retries: (s.retries > 0).then_some(s.retries),
            ..TaskSpec::default()
        })
    }

    fn needed_outputs(&self, stage: &Stage, arg: &str) -> Option<Vec<String>> {
        stage
            .needs
            .iter()
            .find(|n| arg == outputs_placeholder(n))
            .map(|n| self.all_outputs(self.index(n)))
    }

    /// Counts per stage.
    pub fn counts(&self, stage: usize) -> StageCounts {
        StageCounts {
            all_known: self.all_known[stage],
            ..self.counts[stage].clone()
        }
    }
}

/// The id of the task for `item` of `stage`: the same in every session of a run, so a result is
/// matched to its item whichever runner process submitted it.
pub fn task_id(stage: &str, item: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(item.as_bytes());
    let short: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{stage}-{short}")
}

#[cfg(test)]
mod tests;
