//! What a run records: its checkpoints (a delta of what changed, or a full state once the deltas
//! add up to the last full one), read back and adopted when a run is resumed.

use std::collections::{BTreeMap, HashMap};

use lapin::Channel;
use tracing::warn;
use warren_broker::protocol::{self, PROTOCOL_VERSION};
use warren_broker::publisher::{Publisher, message_properties};
use warren_broker::topology::run_queue;

use crate::checkpoint::{ack_checkpointed, take_states};
use crate::pipeline::Each;
use crate::pipeline::plan::{ItemState, StageCounts, task_id};
use crate::pipeline::state::{
    MESSAGE_TYPE_RUN, RunState, StageEdge, decode_head, decode_state, encode_full, fold_states,
};

use super::{COMPACT_AFTER, RunError, Runner};

impl Runner<'_> {
    /// A checkpoint of this session's progress that acknowledges the results taken so far.
    pub(super) async fn record(
        &mut self,
        publisher: &Publisher,
        results: &Channel,
        unacked: &mut Option<u64>,
    ) -> Result<(), RunError> {
        let ack = unacked.take().map(|tag| (results, tag));
        self.checkpoint(publisher, ack, false, false).await
    }

    /// Records progress and acknowledges the results up to `ack`. A session's first checkpoint
    /// (`full`) takes every recorded state, merges it into the plan when `adopt` (the first
    /// session), and publishes a full state before acknowledging the old ones; later ones publish
    /// a delta of what changed, or a full state once the deltas add up to the last full one.
    pub(super) async fn checkpoint(
        &mut self,
        publisher: &Publisher,
        ack: Option<(&Channel, u64)>,
        full: bool,
        adopt: bool,
    ) -> Result<(), RunError> {
        self.confirm_submitted(None).await?;
        let compact =
            full || self.since_full >= COMPACT_AFTER.max(self.full_size) || self.plan.complete();
        if !compact {
            let changes = self.plan.take_changes();
            // Results that changed nothing (repeats, strangers set aside) are acknowledged
            // without a new state: every earlier change is in a confirmed one already.
            if !changes.is_empty() {
                self.since_full += changes.len();
                let state = self.state(changes);
                self.publish_state(publisher, state.generation, protocol::encode(&state))
                    .await?;
            }
            ack_checkpointed(publisher.channel(), &[], ack).await?;
            return Ok(());
        }
        let run = self.options.run.clone();
        let queue = run_queue(&run);
        let mut states = Vec::new();
        let taken = take_states(publisher.channel(), &queue, publisher.user(), |message| {
            // Only a state this runner's own user wrote (as RabbitMQ verified) is adopted: a
            // state pre-seeded by anyone else would make the run skip its work.
            if let Some(sender) = message.stranger {
                warn!(run = %run, sender = sender.unwrap_or("(unverified)"), "ignoring a state of this run written by another user");
                return;
            }
            // Only a session's first checkpoint adopts what is recorded; the others need the
            // generation alone, and skip the items.
            match decode_head(message.data) {
                Ok(head) if head.run == run => {
                    self.generation = self.generation.max(head.generation);
                    if adopt {
                        match decode_state(message.data) {
                            Ok(state) => states.push(state),
                            Err(_) => warn!(run = %run, "ignoring an unreadable message in the run's state queue"),
                        }
                    }
                }
                _ => warn!(run = %run, "ignoring an unreadable message in the run's state queue"),
            }
        })
        .await?;
        if adopt && let Some(state) = fold_states(states) {
            self.adopt(&state)?;
        }
        // The full state below records everything, the adopted items included.
        self.plan.take_changes();
        let head = self.state(Vec::new());
        let body = encode_full(
            &RunState {
                delta: false,
                ..head
            },
            &self.plan,
        );
        self.full_size = self
            .counts()
            .iter()
            .map(|c| c.running + c.done + c.up_to_date + c.failed)
            .sum::<u64>()
            .try_into()
            .unwrap_or(usize::MAX);
        self.since_full = 0;
        self.publish_state(publisher, head.generation, body).await?;
        ack_checkpointed(publisher.channel(), &taken, ack).await?;
        Ok(())
    }

    /// Publishes the run's state `generation` (encoded as `body`) and waits for its confirm.
    async fn publish_state(
        &mut self,
        publisher: &Publisher,
        generation: u64,
        body: Vec<u8>,
    ) -> Result<(), RunError> {
        publisher
            .publish(
                &run_queue(&self.options.run),
                &body,
                message_properties(MESSAGE_TYPE_RUN),
            )
            .await?;
        self.generation = generation;
        self.checkpoint_bytes += body.len() as u64;
        Ok(())
    }

    /// Takes over a recorded state: its token, and every item that is not waiting.
    fn adopt(&mut self, state: &RunState) -> Result<(), RunError> {
        if state.fingerprint != self.plan.pipeline().fingerprint {
            return Err(RunError::Invalid(format!(
                "run {} was started with another version of this pipeline file; resume it with the \
                 original, or start a new run (items whose outputs are up to date are skipped)",
                state.run
            )));
        }
        self.token = state.token.clone();
        let stages: Vec<String> = self
            .plan
            .pipeline()
            .stages
            .iter()
            .map(|s| s.name.clone())
            .collect();
        for (index, name) in stages.iter().enumerate() {
            let Some(items) = state.stages.get(name) else {
                continue;
            };
            for (item, item_state) in items {
                match item_state {
                    ItemState::Submitted => {
                        self.plan.submitted(index, item);
                        self.in_flight
                            .insert(task_id(name, item), (index, item.clone()));
                    }
                    ItemState::Done | ItemState::UpToDate | ItemState::Failed(_) => {
                        self.plan.record(index, item, item_state.clone());
                    }
                    ItemState::Waiting | ItemState::Skipped => {}
                }
            }
        }
        Ok(())
    }

    /// Each stage's counts, with how many of its submitted tasks wait in their queue: a queue's
    /// waiting tasks (as last read) are given to its stages in pipeline order, each at most as
    /// many as it has submitted.
    pub(super) fn counts(&self) -> Vec<StageCounts> {
        let mut left: HashMap<&str, u64> = self
            .ahead
            .iter()
            .map(|(queue, ahead)| (queue.as_str(), ahead.waiting))
            .collect();
        let stages = &self.plan.pipeline().stages;
        (0..stages.len())
            .map(|index| {
                let mut counts = self.plan.counts(index);
                let waiting = left.entry(stages[index].queue.as_str()).or_default();
                counts.queued = counts.running.min(*waiting);
                *waiting -= counts.queued;
                counts
            })
            .collect()
    }

    /// The run's next state as a delta holding `changes` (with no changes: every field of a
    /// full state but its items, which [`encode_full`] writes from the plan).
    fn state(&self, changes: Vec<(usize, String, ItemState)>) -> RunState {
        let pipeline = self.plan.pipeline();
        let mut stages: BTreeMap<String, BTreeMap<String, ItemState>> = BTreeMap::new();
        for (stage, item, state) in changes {
            stages
                .entry(pipeline.stages[stage].name.clone())
                .or_default()
                .insert(item, state);
        }
        let counts = pipeline
            .stages
            .iter()
            .map(|s| s.name.clone())
            .zip(self.counts())
            .collect();
        RunState {
            v: PROTOCOL_VERSION,
            run: self.options.run.clone(),
            generation: self.generation + 1,
            fingerprint: pipeline.fingerprint.clone(),
            token: self.token.clone(),
            workdir: pipeline.workdir.display().to_string(),
            stages,
            counts,
            complete: self.plan.complete(),
            delta: true,
            edges: pipeline
                .stages
                .iter()
                .flat_map(|stage| {
                    let each = match &stage.each {
                        Each::OutputsOf(from) => Some((from.clone(), "each")),
                        _ => None,
                    };
                    each.into_iter()
                        .chain(stage.needs.iter().map(|n| (n.clone(), "needs")))
                        .map(|(from, kind)| StageEdge {
                            from,
                            to: stage.name.clone(),
                            kind: kind.to_string(),
                        })
                })
                .collect(),
        }
    }
}
