//! The batch manifest and the cancellation record: the book-keeping envelopes of a batch.

use serde::{Deserialize, Serialize};

use super::decode::{DecodeError, decode_checked};

/// Book-keeping for one batch, kept in the batch's manifest queue so that any process can collect
/// the batch's results later (see `docs/protocol.md`, "Batches").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchManifest {
    /// Envelope version; see [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Batch id.
    pub batch: String,
    /// Number of tasks in the batch; their `seq` run from 0 to `total - 1`.
    pub total: u32,
    /// Task queue the batch was submitted to.
    pub queue: String,
    /// Generation of this manifest; the highest one in the queue is current.
    pub generation: u64,
    /// `seq` ranges (inclusive `[first, last]`) whose results were already written out.
    #[serde(default)]
    pub collected: Vec<[u32; 2]>,
    /// Tasks replayed from the dead-letter queue into this batch, as `[seq, replay]` pairs: the
    /// batch is complete only once a result of each replay is collected too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<[u32; 2]>,
    /// The `[seq, replay]` pairs whose replayed result was collected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays_collected: Vec<[u32; 2]>,
    /// The batch's secret, when its tasks carry one: results without it are not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The RabbitMQ users whose results a collector takes (their broker-verified `user_id`);
    /// None takes results from anyone who has the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answerers: Option<Vec<String>>,
}

/// Decodes a batch manifest.
pub fn decode_manifest(bytes: &[u8], limit: usize) -> Result<BatchManifest, DecodeError> {
    decode_checked(bytes, limit, &[])
}
/// Message type of a cancellation record.
pub const MESSAGE_TYPE_CANCEL: &str = "warren.cancel";

/// A cancellation, kept in the cancellations stream: a whole batch, or one task of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancellation {
    /// Envelope version; see [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Batch id.
    pub batch: String,
    /// One task of the batch; None cancels the whole batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// When it was cancelled (RFC 3339).
    pub at: String,
}

/// Decodes a cancellation record.
pub fn decode_cancellation(bytes: &[u8]) -> Result<Cancellation, DecodeError> {
    decode_checked(bytes, 64 * 1024, &[])
}
