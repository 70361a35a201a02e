//! Publisher confirms under concurrency: many tasks publishing on one confirm channel, to a queue
//! that refuses part of what they send (`x-overflow = reject-publish`), must each learn the fate
//! of their own message. lapin numbers a publish (its delivery tag) before it queues the frames,
//! without a lock over both, so two threads publishing at once on one channel can send their
//! frames in the other order than they were numbered: RabbitMQ's ack for one message then
//! resolves the other's confirm. With every message accepted nobody notices; with a refusal, a
//! refused message passes for confirmed (a worker would acknowledge a task whose result is gone).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use warren_broker::publisher::Publisher;

use common::{AMQP_URL, unique_queue};

const PUBLISHERS: usize = 32;
const EACH: usize = 150;
const QUEUE_LIMIT: i32 = 20;

/// A body that names its message, padded to a size that varies from message to message, so that
/// building one publish's frames takes longer than another's.
fn body(id: usize) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.resize(8 + (id * 7919) % 48_000, b'.');
    body
}

fn id_of(body: &[u8]) -> Option<usize> {
    Some(usize::from_be_bytes(body.get(..8)?.try_into().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_on_one_publisher_each_get_their_own_verdict() {
    let queue = unique_queue("concurrent-confirms");
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("connect");
    let setup = connection.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(QUEUE_LIMIT));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args.insert("x-expires".into(), AMQPValue::LongInt(120_000));
    setup
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare a queue that refuses past its limit");

    // A slow consumer (one message at a time) keeps the queue near its limit, so that publishes
    // are taken and refused in turns all through the run, not only once at the end.
    let delivered = Arc::new(Mutex::new(BTreeSet::new()));
    setup
        .basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = setup
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let seen = delivered.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if let Some(id) = id_of(&delivery.data) {
                seen.lock().expect("lock").insert(id);
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
            if delivery.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
    });

    let publisher = Publisher::open(&connection).await.expect("confirm channel");
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let publisher = publisher.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut confirmed = Vec::new();
            for i in 0..EACH {
                let id = p * EACH + i;
                let sent = publisher
                    .send(&queue, &body(id), lapin::BasicProperties::default())
                    .await
                    .expect("send");
                if sent.confirmed().await.is_ok() {
                    confirmed.push(id);
                }
            }
            confirmed
        }));
    }
    let mut confirmed = BTreeSet::new();
    for task in tasks {
        confirmed.extend(task.await.expect("publisher task"));
    }
    assert!(
        confirmed.len() < PUBLISHERS * EACH,
        "the queue refused nothing: the test proves nothing"
    );

    // Everything confirmed is in the queue or already delivered; wait for the reader to drain it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while delivered.lock().expect("lock").len() < confirmed.len()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    reader.abort();
    let _ = setup
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let delivered = delivered.lock().expect("lock").clone();
    let lost: Vec<_> = confirmed.difference(&delivered).take(10).collect();
    let unconfirmed: Vec<_> = delivered.difference(&confirmed).take(10).collect();
    assert!(
        lost.is_empty() && unconfirmed.is_empty(),
        "of {} publishes, {} confirmed and {} delivered: confirmed but never delivered {lost:?}, \
         delivered but reported refused {unconfirmed:?}",
        PUBLISHERS * EACH,
        confirmed.len(),
        delivered.len()
    );
}
