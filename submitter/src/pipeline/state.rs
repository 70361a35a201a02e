//! A run's recorded state: the message kept in `warren.runs.<run>` (full, or a delta of what
//! changed), how the messages fold into one state, and reading it without taking it over
//! (`warren status --run`, `warren ui`). Written by the runner (`run.rs`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use warren_broker::topology::{self, run_queue};
use warren_broker::{AmqpSettings, BrokerError};

use super::plan::{ItemState, StageCounts};
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
    let _ = channel.close(200, "read".into()).await;
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
}
