//! A run's recorded state: the message kept in `warren.runs.<run>` (full, or a delta of what
//! changed), how the messages fold into one state, and reading it without taking it over
//! (`warren status --run`, `warren ui`). Written by the runner (`run.rs`).

use std::collections::BTreeMap;

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};
use warren_broker::connection::close_channel;
use warren_broker::topology::{self, run_queue};
use warren_broker::{AmqpSettings, BrokerError};

use super::plan::{ItemState, Plan, StageCounts};
use super::run::RunError;
use crate::checkpoint::take_states;
use crate::submit::Submitter;

/// AMQP `type` of a run's state message.
pub const MESSAGE_TYPE_RUN: &str = "warren.run";
/// Largest state message read.
const MAX_STATE_BYTES: usize = 64 << 20;

/// A run's recorded state (the message kept in `warren.runs.<run>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Envelope version.
    pub v: u32,
    /// Run id.
    pub run: String,
    /// Newest wins.
    pub generation: u64,
    /// Fingerprint of the pipeline file: a resume must use the same pipeline.
    pub fingerprint: String,
    /// The run's secret: results without it are not its workers'.
    pub token: String,
    /// Folder the commands run in.
    pub workdir: String,
    /// Per stage (by name), the items that are not waiting, with their state.
    pub stages: BTreeMap<String, BTreeMap<String, ItemState>>,
    /// Per stage in pipeline order, its counts (for `warren status --run`).
    #[serde(default)]
    pub counts: Vec<(String, StageCounts)>,
    /// Whether the run finished.
    #[serde(default)]
    pub complete: bool,
    /// The pipeline's edges `(from, to)`: `to` takes `from`'s outputs per item (`each =
    /// "from.outputs"`, kind `each`) or waits for all of `from` (`needs`, kind `needs`).
    #[serde(default)]
    pub edges: Vec<StageEdge>,
    /// A delta: `stages` holds only the items whose state changed since generation
    /// `generation - 1`; read it on top of the full state and deltas before it (see
    /// [`fold_states`]).
    #[serde(default)]
    pub delta: bool,
}

/// A full state encoded straight from the plan: `head` gives every field but the items, which
/// are written from the plan as they are, never copied (a run of 100,000s of items would hold
/// them twice while it checkpoints).
pub(crate) fn encode_full(head: &RunState, plan: &Plan) -> Vec<u8> {
    rmp_serde::to_vec_named(&FullState { head, plan }).unwrap_or_default()
}

struct FullState<'a> {
    head: &'a RunState,
    plan: &'a Plan,
}

/// The fields of [`RunState`], by the same names, in its order.
impl Serialize for FullState<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let head = self.head;
        let mut state = serializer.serialize_struct("RunState", 11)?;
        state.serialize_field("v", &head.v)?;
        state.serialize_field("run", &head.run)?;
        state.serialize_field("generation", &head.generation)?;
        state.serialize_field("fingerprint", &head.fingerprint)?;
        state.serialize_field("token", &head.token)?;
        state.serialize_field("workdir", &head.workdir)?;
        state.serialize_field("stages", &Stages(self.plan))?;
        state.serialize_field("counts", &head.counts)?;
        state.serialize_field("complete", &head.complete)?;
        state.serialize_field("edges", &head.edges)?;
        state.serialize_field("delta", &false)?;
        state.end()
    }
}

/// Every stage's recorded items, by stage name.
struct Stages<'a>(&'a Plan);

impl Serialize for Stages<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let stages = &self.0.pipeline().stages;
        let mut map = serializer.serialize_map(Some(stages.len()))?;
        for (index, stage) in stages.iter().enumerate() {
            map.serialize_entry(&stage.name, &Recorded(self.0, index))?;
        }
        map.end()
    }
}

/// A stage's items in a recorded state (see [`ItemState::is_recorded`]).
struct Recorded<'a>(&'a Plan, usize);

impl Serialize for Recorded<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let recorded = || {
            self.0
                .items(self.1)
                .iter()
                .filter(|(_, state)| state.is_recorded())
        };
        let mut map = serializer.serialize_map(Some(recorded().count()))?;
        for (item, state) in recorded() {
            map.serialize_entry(item, state)?;
        }
        map.end()
    }
}

/// The run and generation of a state message, read without its items.
#[derive(Deserialize)]
pub(crate) struct StateHead {
    /// Run id.
    pub run: String,
    /// Its generation.
    pub generation: u64,
}

/// Reads a state message's run and generation only.
pub(crate) fn decode_head(bytes: &[u8]) -> Result<StateHead, String> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err("state message too large".into());
    }
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

/// Folds a run's state messages into one state: the newest full state, with each delta written
/// after it applied in order. A delta whose predecessor is missing (held by another reader at
/// that moment) ends the fold: what is returned is then an older state, never a wrong one.
pub fn fold_states(mut states: Vec<RunState>) -> Option<RunState> {
    let base = states
        .iter()
        .filter(|s| !s.delta)
        .map(|s| s.generation)
        .max()?;
    states.retain(|s| s.generation >= base);
    states.sort_by_key(|s| (s.generation, s.delta));
    let mut parts = states.into_iter();
    let mut folded = parts.find(|s| !s.delta)?;
    for delta in parts {
        if !delta.delta || delta.generation != folded.generation + 1 {
            break;
        }
        for (stage, items) in delta.stages {
            folded.stages.entry(stage).or_default().extend(items);
        }
        folded.generation = delta.generation;
        folded.counts = delta.counts;
        folded.complete = delta.complete;
    }
    Some(folded)
}

/// One edge of a pipeline's stage graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEdge {
    /// The stage whose work the other takes.
    pub from: String,
    /// The stage that depends on it.
    pub to: String,
    /// `each` (item by item) or `needs` (all of it first).
    pub kind: String,
}

/// Reads the newest recorded state of `run`, leaving it in place; None when the run has none.
pub async fn read_state(amqp: &AmqpSettings, run: &str) -> Result<Option<RunState>, RunError> {
    let mut states = read_states(amqp, &[run.to_string()]).await?;
    Ok(states.pop().flatten())
}

/// Reads the recorded state of each of `runs` over one connection (a page listing many runs
/// opens one, not one per run); None for a run with no state or one that cannot be read.
pub async fn read_states(
    amqp: &AmqpSettings,
    runs: &[String],
) -> Result<Vec<Option<RunState>>, RunError> {
    let mut submitter = Submitter::new(amqp.clone(), "warren-status");
    let (connection, _) = submitter.connection().await?;
    let own = connection.status().username();
    let mut found = Vec::with_capacity(runs.len());
    for run in runs {
        found.push(match read_one(connection, &own, run).await {
            Ok(state) => state,
            Err(e) if runs.len() == 1 => return Err(e),
            Err(_) => None,
        });
    }
    Ok(found)
}

async fn read_one(
    connection: &lapin::Connection,
    own: &str,
    run: &str,
) -> Result<Option<RunState>, RunError> {
    // A channel per run: a passive declare of a missing queue closes its channel.
    let channel = connection.create_channel().await?;
    if let Err(BrokerError::QueueNotFound { .. }) =
        topology::inspect(&channel, &run_queue(run)).await
    {
        return Ok(None);
    }
    let mut states = Vec::new();
    take_states(&channel, &run_queue(run), own, |message| {
        if message.stranger.is_none()
            && let Ok(state) = decode_state(message.data)
        {
            states.push(state);
        }
    })
    .await?;
    // Closing the channel gives the messages back, unacknowledged.
    close_channel(&channel, "read").await;
    Ok(fold_states(states))
}

pub(crate) fn decode_state(bytes: &[u8]) -> Result<RunState, String> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err("state message too large".into());
    }
    rmp_serde::from_slice::<RunState>(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_broker::protocol::PROTOCOL_VERSION;

    fn state(generation: u64, delta: bool, items: &[(&str, ItemState)]) -> RunState {
        RunState {
            v: PROTOCOL_VERSION,
            run: "r".into(),
            generation,
            fingerprint: "f".into(),
            token: "t".into(),
            workdir: "/w".into(),
            stages: BTreeMap::from([(
                "one".to_string(),
                items
                    .iter()
                    .map(|(i, s)| (i.to_string(), s.clone()))
                    .collect(),
            )]),
            counts: vec![(
                "one".into(),
                StageCounts {
                    done: generation,
                    ..StageCounts::default()
                },
            )],
            complete: false,
            edges: Vec::new(),
            delta,
        }
    }

    fn items(folded: &RunState) -> Vec<(String, ItemState)> {
        folded.stages["one"]
            .iter()
            .map(|(i, s)| (i.clone(), s.clone()))
            .collect()
    }

    #[test]
    fn deltas_after_the_newest_full_state_are_applied_in_order() {
        let failed = ItemState::Failed("exit_status".into());
        let folded = fold_states(vec![
            state(5, true, &[("b", failed.clone())]),
            state(
                3,
                false,
                &[("a", ItemState::Done), ("b", ItemState::Submitted)],
            ),
            state(
                4,
                true,
                &[("c", ItemState::Submitted), ("b", ItemState::Done)],
            ),
            state(2, true, &[("z", ItemState::Done)]),
            state(1, false, &[("y", ItemState::Done)]),
        ])
        .expect("a full state is there");
        assert_eq!(folded.generation, 5);
        assert!(!folded.delta);
        assert_eq!(
            folded.counts[0].1.done, 5,
            "counts come from the newest delta"
        );
        assert_eq!(
            items(&folded),
            vec![
                ("a".into(), ItemState::Done),
                ("b".into(), failed),
                ("c".into(), ItemState::Submitted)
            ]
        );
    }

    #[test]
    fn a_missing_delta_ends_the_fold_at_an_older_state() {
        let folded = fold_states(vec![
            state(3, false, &[("a", ItemState::Submitted)]),
            state(4, true, &[("a", ItemState::Done)]),
            state(6, true, &[("b", ItemState::Done)]),
        ])
        .expect("a full state is there");
        assert_eq!(folded.generation, 4);
        assert_eq!(items(&folded), vec![("a".into(), ItemState::Done)]);
    }

    #[test]
    fn a_newer_full_state_supersedes_older_deltas_and_deltas_alone_are_no_state() {
        let folded = fold_states(vec![
            state(3, false, &[("a", ItemState::Submitted)]),
            state(4, true, &[("a", ItemState::Done)]),
            state(5, false, &[("a", ItemState::Done), ("b", ItemState::Done)]),
        ])
        .expect("a full state is there");
        assert_eq!(folded.generation, 5);
        assert_eq!(folded.stages["one"].len(), 2);
        assert!(fold_states(vec![state(4, true, &[("a", ItemState::Done)])]).is_none());
        assert!(fold_states(Vec::new()).is_none());
    }

    #[test]
    fn a_full_state_written_from_the_plan_reads_back_as_its_recorded_items() {
        let text = "[[stage]]\nname = \"one\"\neach = \"raw/*.tif\"\ncommand = [\"true\", \"{}\"]\n\
                    outputs = [\"a/{name}\"]\n\n[[stage]]\nname = \"two\"\neach = \"one.outputs\"\n\
                    command = [\"true\", \"{}\"]\n";
        let pipeline =
            crate::pipeline::Pipeline::parse(text, std::path::Path::new("/d/p.toml"), "q").unwrap();
        let mut plan = Plan::new(pipeline);
        plan.add_items(
            0,
            [
                "raw/x.tif".to_string(),
                "raw/y.tif".to_string(),
                "raw/z.tif".to_string(),
            ],
        );
        plan.submitted(0, "raw/x.tif");
        plan.record(0, "raw/x.tif", ItemState::Done);
        plan.submitted(0, "raw/y.tif");
        plan.submitted(1, "a/x.tif");
        let head = state(9, false, &[]);
        let read: RunState =
            rmp_serde::from_slice(&encode_full(&head, &plan)).expect("a readable state");
        let expected = BTreeMap::from([
            (
                "one".to_string(),
                BTreeMap::from([
                    ("raw/x.tif".to_string(), ItemState::Done),
                    ("raw/y.tif".to_string(), ItemState::Submitted),
                ]),
            ),
            (
                "two".to_string(),
                BTreeMap::from([("a/x.tif".to_string(), ItemState::Submitted)]),
            ),
        ]);
        assert_eq!(
            read,
            RunState {
                stages: expected,
                ..head
            }
        );
        let head_only = decode_head(&encode_full(&read, &plan)).unwrap();
        assert_eq!((head_only.run.as_str(), head_only.generation), ("r", 9));
    }
}
