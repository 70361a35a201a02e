//! The one place a task delivery is settled: acknowledged once its outcome is safe, or given back
//! to the queue. Acknowledgements that fall due together go to RabbitMQ as one `multiple` ack
//! when no unsettled delivery lies below them, which spares the broker a quorum-queue command per
//! task and the worker a round trip to lapin's IO thread. A delivery is never acknowledged before
//! its own verdict, and never held back waiting for a slower one below it: that one is
//! acknowledged alone.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{mpsc, oneshot};

/// Why a delivery could not be settled.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SettleError {
    /// The channel refused the frame (it is closed: the broker requeues the delivery itself).
    #[error("{0}")]
    Channel(#[from] lapin::Error),
    /// The delivery was settled before: a second verdict would close the channel.
    #[error("delivery {0} was already settled")]
    AlreadySettled(u64),
    /// The session's settler has stopped (its connection is being closed).
    #[error("the session is over")]
    Stopped,
}

/// What becomes of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Done with: its result (or dead letter, or retry) is confirmed.
    Ack,
    /// Back to the queue, to be run again.
    Requeue,
}

/// One frame to send, and the deliveries it settles.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    tag: u64,
    verdict: Verdict,
    /// An ack of every unacknowledged delivery up to `tag` on the channel.
    multiple: bool,
    settles: Vec<u64>,
}

/// The frames that settle `due` (tag and verdict, in any order), given the deliveries not settled
/// yet (`due` among them), which it takes out of `unsettled`: no copy per round. Requeues go
/// first, one each: a `multiple` ack sent before would have taken them. Then the acks below every
/// other unsettled delivery go as one `multiple` ack, and the rest one each. Tags not unsettled
/// (settled before, or twice in `due`) get no frame.
fn plan(unsettled: &mut BTreeSet<u64>, due: &[(u64, Verdict)]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut acks = Vec::new();
    let mut sorted = due.to_vec();
    // Stable: of two verdicts on one delivery, the first to come is the one sent.
    sorted.sort_by_key(|&(tag, _)| tag);
    for (tag, verdict) in sorted {
        if !unsettled.remove(&tag) {
            continue;
        }
        match verdict {
            Verdict::Requeue => frames.push(Frame {
                tag,
                verdict,
                multiple: false,
                settles: vec![tag],
            }),
            Verdict::Ack => acks.push(tag),
        }
    }
    // Every delivery below the lowest one still unsettled is settled or acked here.
    let floor = unsettled.first().copied().unwrap_or(u64::MAX);
    let (together, alone): (Vec<u64>, Vec<u64>) = acks.into_iter().partition(|&t| t < floor);
    if let Some(&last) = together.last() {
        frames.push(Frame {
            tag: last,
            verdict: Verdict::Ack,
            multiple: together.len() > 1,
            settles: together,
        });
    }
    frames.extend(alone.into_iter().map(|tag| Frame {
        tag,
        verdict: Verdict::Ack,
        multiple: false,
        settles: vec![tag],
    }));
    frames
}

/// A verdict on one delivery, and who to tell once its frame is handed to the connection.
struct Request {
    tag: u64,
    verdict: Verdict,
    done: oneshot::Sender<Result<(), SettleError>>,
}

/// The deliveries of the channel not settled yet.
type Unsettled = Arc<Mutex<BTreeSet<u64>>>;

/// Settles the deliveries of one consumer channel, whose deliveries all pass through
/// [`Settler::arrived`]. Clones share it; it stops when the last one is dropped.
#[derive(Clone)]
pub(crate) struct Settler {
    requests: mpsc::UnboundedSender<Request>,
    /// Shared with the settling task: an arrival is recorded here at once, without waking it
    /// (a wake-up of another thread for every delivery, on the way to running its task).
    unsettled: Unsettled,
}

impl Settler {
    /// Starts settling `channel`'s deliveries.
    pub(crate) fn spawn(channel: Channel) -> Self {
        let (requests, incoming) = mpsc::unbounded_channel();
        let unsettled = Unsettled::default();
        tokio::spawn(settle_loop(channel, Arc::clone(&unsettled), incoming));
        Self {
            requests,
            unsettled,
        }
    }

    /// Records a delivery as unsettled. Call it before anything can settle the delivery.
    pub(crate) fn arrived(&self, delivery: &Delivery) {
        lock(&self.unsettled).insert(delivery.delivery_tag);
    }

    /// Acknowledges a delivery; returns once the frame is handed to the connection.
    pub(crate) async fn ack(&self, delivery: &Delivery) -> Result<(), SettleError> {
        self.settle(delivery, Verdict::Ack).await
    }

    /// Gives a delivery back to its queue, to be run again.
    pub(crate) async fn requeue(&self, delivery: &Delivery) -> Result<(), SettleError> {
        self.settle(delivery, Verdict::Requeue).await
    }

    async fn settle(&self, delivery: &Delivery, verdict: Verdict) -> Result<(), SettleError> {
        let (done, answer) = oneshot::channel();
        let request = Request {
            tag: delivery.delivery_tag,
            verdict,
            done,
        };
        self.requests
            .send(request)
            .map_err(|_| SettleError::Stopped)?;
        answer.await.map_err(|_| SettleError::Stopped)?
    }
}

/// Takes what is due (everything waiting when it wakes), plans its frames and sends them in
/// order; what falls due meanwhile is the next round's.
async fn settle_loop(
    channel: Channel,
    unsettled: Unsettled,
    mut incoming: mpsc::UnboundedReceiver<Request>,
) {
    let mut waiting = Vec::new();
    while let Some(first) = incoming.recv().await {
        let mut next = Some(first);
        while let Some(Request { tag, verdict, done }) =
            next.take().or_else(|| incoming.try_recv().ok())
        {
            waiting.push((tag, verdict, done));
        }
        let due: Vec<(u64, Verdict)> = waiting.iter().map(|(t, v, _)| (*t, *v)).collect();
        // Every delivery due arrived before its verdict was asked for, so it is in the set.
        let frames = plan(&mut lock(&unsettled), &due);
        let mut outcomes = HashMap::with_capacity(due.len());
        for frame in frames {
            let sent = match frame.verdict {
                Verdict::Ack => {
                    let options = BasicAckOptions {
                        multiple: frame.multiple,
                    };
                    channel.basic_ack(frame.tag, options).await
                }
                Verdict::Requeue => {
                    let options = BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    };
                    channel.basic_nack(frame.tag, options).await
                }
            };
            for tag in frame.settles {
                outcomes.insert(tag, sent.clone().map_err(SettleError::from));
            }
        }
        for (tag, _, done) in waiting.drain(..) {
            // Of two verdicts on one delivery, the first takes the outcome; the second was not sent.
            let outcome = outcomes
                .remove(&tag)
                .unwrap_or(Err(SettleError::AlreadySettled(tag)));
            let _ = done.send(outcome);
        }
    }
}

/// The unsettled set; each change to it is one insert or a `plan`, so a panic elsewhere leaves it
/// whole.
fn lock(unsettled: &Unsettled) -> MutexGuard<'_, BTreeSet<u64>> {
    unsettled.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{Ack, Requeue};

    fn frame(tag: u64, verdict: Verdict, multiple: bool, settles: &[u64]) -> Frame {
        Frame {
            tag,
            verdict,
            multiple,
            settles: settles.to_vec(),
        }
    }

    #[test]
    fn plans_the_fewest_frames_that_settle_only_what_is_due() {
        // What, the unsettled deliveries, the verdicts due, the frames wanted.
        type Case = (&'static str, Vec<u64>, Vec<(u64, Verdict)>, Vec<Frame>);
        let cases: Vec<Case> = vec![
            (
                "one ack",
                vec![1],
                vec![(1, Ack)],
                vec![frame(1, Ack, false, &[1])],
            ),
            (
                "acks at the bottom go together, in any order",
                vec![1, 2, 3, 4],
                vec![(3, Ack), (1, Ack), (2, Ack)],
                vec![frame(3, Ack, true, &[1, 2, 3])],
            ),
            (
                "an unsettled delivery below holds nothing back: those above go alone",
                vec![1, 2, 3],
                vec![(2, Ack), (3, Ack)],
                vec![frame(2, Ack, false, &[2]), frame(3, Ack, false, &[3])],
            ),
            (
                "a multiple ack stops below the first unsettled delivery",
                vec![4, 5, 6, 7, 9],
                vec![(4, Ack), (5, Ack), (7, Ack), (9, Ack)],
                vec![
                    frame(5, Ack, true, &[4, 5]),
                    frame(7, Ack, false, &[7]),
                    frame(9, Ack, false, &[9]),
                ],
            ),
            (
                "requeues go first and alone, and the acks pass over them",
                vec![1, 2, 3],
                vec![(3, Ack), (2, Requeue), (1, Ack)],
                vec![frame(2, Requeue, false, &[2]), frame(3, Ack, true, &[1, 3])],
            ),
            (
                "a delivery settled before, or twice now, gets no frame",
                vec![2, 3],
                vec![(1, Ack), (2, Ack), (2, Requeue), (3, Requeue)],
                vec![frame(3, Requeue, false, &[3]), frame(2, Ack, false, &[2])],
            ),
            ("nothing due", vec![1, 2], vec![], vec![]),
        ];
        for (what, unsettled, due, want) in cases {
            let mut unsettled: BTreeSet<u64> = unsettled.into_iter().collect();
            let due_tags: BTreeSet<u64> = due.iter().map(|&(tag, _)| tag).collect();
            let untouched: BTreeSet<u64> = unsettled.difference(&due_tags).copied().collect();
            assert_eq!(plan(&mut unsettled, &due), want, "{what}");
            assert_eq!(unsettled, untouched, "{what}: only what was due is settled");
        }
    }

    /// Against the real broker (the test vhost `tests/run` makes): verdicts given out of order,
    /// some together, settle exactly their own deliveries; a second verdict is refused without
    /// closing the channel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn out_of_order_verdicts_settle_exactly_their_deliveries() {
        use futures_lite::StreamExt;
        use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
        use lapin::types::FieldTable;
        use lapin::{BasicProperties, Connection, ConnectionProperties};

        let url = "amqp://guest:guest@127.0.0.1:5672/warren-test";
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("the test broker");
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue")
            .name()
            .clone();
        for i in 1..=6u8 {
            channel
                .basic_publish(
                    "".into(),
                    queue.clone(),
                    BasicPublishOptions::default(),
                    &[i],
                    BasicProperties::default(),
                )
                .await
                .expect("publish");
        }
        let consuming = connection.create_channel().await.expect("channel");
        let mut consumer = consuming
            .basic_consume(
                queue.clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let settler = Settler::spawn(consuming.clone());
        let mut deliveries = Vec::new();
        for _ in 0..6 {
            let delivery = consumer.next().await.expect("delivery").expect("delivery");
            settler.arrived(&delivery);
            deliveries.push(delivery);
        }
        let [d1, d2, d3, d4, d5, d6] = &deliveries[..] else {
            panic!("six deliveries");
        };
        let (a2, a3, r4, a6) = tokio::join!(
            settler.ack(d2),
            settler.ack(d3),
            settler.requeue(d4),
            settler.ack(d6)
        );
        for outcome in [a2, a3, r4, a6] {
            outcome.expect("settled");
        }
        let (a1, a5) = tokio::join!(settler.ack(d1), settler.ack(d5));
        a1.expect("settled");
        a5.expect("settled");
        assert!(matches!(
            settler.ack(d2).await,
            Err(SettleError::AlreadySettled(_))
        ));
        let again = consumer.next().await.expect("delivery").expect("delivery");
        assert_eq!(again.data, vec![4], "only the requeued delivery comes back");
        assert!(again.redelivered);
        settler.arrived(&again);
        settler.ack(&again).await.expect("settled");
        // Closing the channel would requeue anything left unacknowledged: nothing is.
        consuming.close(200, "done".into()).await.expect("close");
        let left = channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        assert_eq!(
            left.message_count(),
            0,
            "every delivery was acknowledged once"
        );
    }
}
