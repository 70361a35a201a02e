//! How deep a queue is: from the management HTTP API when reachable (ready, unacked, rates), else
//! from a passive queue declare (ready and consumers only).

use std::time::Duration;

use lapin::Channel;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::settings::AmqpSettings;
use crate::topology;

/// Where a depth figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthSource {
    /// The management plugin's HTTP API.
    Management,
    /// A passive `queue.declare` over AMQP (no unacked count).
    PassiveDeclare,
}

impl DepthSource {
    /// Every source, for metrics that show which one is in use.
    pub const ALL: [DepthSource; 2] = [DepthSource::Management, DepthSource::PassiveDeclare];

    /// Snake-case name, as serialized and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DepthSource::Management => "management",
            DepthSource::PassiveDeclare => "passive_declare",
        }
    }
}

/// A snapshot of one queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueDepth {
    /// Queue name.
    pub queue: String,
    /// Messages waiting to be delivered.
    pub ready: u64,
    /// Messages delivered but not yet acknowledged (in flight); unknown without the API.
    pub unacked: Option<u64>,
    /// Consumers attached.
    pub consumers: u64,
    /// Publish rate, messages/s (API only).
    pub publish_rate: Option<f64>,
    /// Acknowledge rate, messages/s (API only).
    pub ack_rate: Option<f64>,
    /// Where the figures came from.
    pub source: DepthSource,
}

/// Client of the RabbitMQ management HTTP API.
#[derive(Clone, Debug)]
pub struct Management {
    base: String,
    user: String,
    password: String,
    vhost: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ApiQueue {
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
    #[serde(default)]
    consumers: u64,
    #[serde(default)]
    message_stats: Option<ApiStats>,
}

/// How busy one worker is, from the management API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerLoad {
    /// The worker's name (its consumer tag).
    pub name: String,
    /// Tasks it holds unacknowledged (running).
    pub unacked: u64,
}

#[derive(Deserialize)]
struct ApiStats {
    publish_details: Option<ApiRate>,
    ack_details: Option<ApiRate>,
}

#[derive(Deserialize)]
struct ApiRate {
    rate: f64,
}

impl Management {
    /// A client for the API at `base` (e.g. `http://127.0.0.1:15672`), or, when `base` is None, at
    /// port 15672 of the AMQP URL's host; credentials and vhost come from the AMQP settings.
    pub fn new(base: Option<&str>, settings: &AmqpSettings) -> Result<Self, BrokerError> {
        let uri = settings.uri()?;
        let base = match base {
            Some(b) => b.trim_end_matches('/').to_string(),
            None => format!("http://{}:15672", uri.authority.host),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| BrokerError::Management {
                url: base.clone(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            base,
            user: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
            vhost: uri.vhost,
            http,
        })
    }

    /// How many tasks each consumer of `queue` holds, by worker name (the consumer tag). The API
    /// refreshes these figures every few seconds, so they are a hint, not a guarantee.
    pub async fn worker_loads(&self, queue: &str) -> Result<Vec<WorkerLoad>, BrokerError> {
        let vhost = encode_path(&self.vhost);
        // Entries are read one by one: the API shows `"channel_details": []` for a consumer whose
        // channel is closing, and one such entry must not hide every other worker.
        let consumers: Vec<serde_json::Value> =
            self.get_json(&format!("/api/consumers/{vhost}")).await?;
        let channels: Vec<serde_json::Value> = self
            .get_json(&format!(
                "/api/vhosts/{vhost}/channels?columns=name,messages_unacknowledged"
            ))
            .await?;
        let unacked: std::collections::HashMap<&str, u64> = channels
            .iter()
            .filter_map(|c| {
                Some((
                    c["name"].as_str()?,
                    c["messages_unacknowledged"].as_u64().unwrap_or(0),
                ))
            })
            .collect();
        Ok(consumers
            .iter()
            .filter(|c| c["queue"]["name"].as_str() == Some(queue))
            .filter_map(|c| {
                let channel = c["channel_details"]["name"].as_str()?;
                Some(WorkerLoad {
                    name: c["consumer_tag"].as_str()?.to_string(),
                    unacked: unacked.get(channel).copied().unwrap_or(0),
                })
            })
            .collect())
    }

    /// Fetches one queue's figures.
    pub async fn queue(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let path = format!(
            "/api/queues/{}/{}",
            encode_path(&self.vhost),
            encode_path(queue)
        );
        let q: ApiQueue = match self.get_json(&path).await {
            Err(BrokerError::Management { detail, .. }) if detail.starts_with("HTTP 404") => {
                return Err(BrokerError::QueueNotFound {
                    queue: queue.to_string(),
                });
            }
            other => other?,
        };
        let stats = q.message_stats.as_ref();
        Ok(QueueDepth {
            queue: queue.to_string(),
            ready: q.messages_ready,
            unacked: Some(q.messages_unacknowledged),
            consumers: q.consumers,
            publish_rate: stats
                .and_then(|s| s.publish_details.as_ref())
                .map(|r| r.rate),
            ack_rate: stats.and_then(|s| s.ack_details.as_ref()).map(|r| r.rate),
            source: DepthSource::Management,
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, BrokerError> {
        let fail = |detail: String| BrokerError::Management {
            url: self.base.clone(),
            detail,
        };
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        match response.status().as_u16() {
            200 => response
                .json()
                .await
                .map_err(|e| fail(format!("unexpected reply from {path}: {e}"))),
            401 | 403 => Err(fail(
                "credentials refused (the user needs the 'monitoring' or 'management' tag)".into(),
            )),
            code => Err(fail(format!("HTTP {code} from {path}"))),
        }
    }
}

/// Depth of `queue` through a passive declare on `channel`.
pub async fn passive_depth(channel: &Channel, queue: &str) -> Result<QueueDepth, BrokerError> {
    let q = topology::inspect(channel, queue).await?;
    Ok(QueueDepth {
        queue: queue.to_string(),
        ready: u64::from(q.message_count()),
        unacked: None,
        consumers: u64::from(q.consumer_count()),
        publish_rate: None,
        ack_rate: None,
        source: DepthSource::PassiveDeclare,
    })
}

/// Percent-encodes a path segment (vhost `/` becomes `%2F`).
fn encode_path(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Combines a passive declare (exact and immediate `ready`) with the management API's figures
/// (unacked, consumers and rates, refreshed every few seconds). Either alone will do; the
/// passive declare's error wins when both fail, as it says more about the queue itself.
pub fn combine(
    passive: Result<QueueDepth, BrokerError>,
    api: Result<QueueDepth, BrokerError>,
) -> Result<QueueDepth, BrokerError> {
    match (passive, api) {
        (Ok(p), Ok(a)) => Ok(QueueDepth {
            ready: p.ready,
            ..a
        }),
        (Ok(p), Err(_)) => Ok(p),
        (Err(_), Ok(a)) => Ok(a),
        (Err(e), Err(_)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(ready: u64, unacked: Option<u64>, source: DepthSource) -> QueueDepth {
        QueueDepth {
            queue: "q".into(),
            ready,
            unacked,
            consumers: 1,
            publish_rate: None,
            ack_rate: None,
            source,
        }
    }

    #[test]
    fn ready_comes_from_the_declare_and_the_rest_from_the_api() {
        let both = combine(
            Ok(depth(7, None, DepthSource::PassiveDeclare)),
            Ok(depth(2, Some(3), DepthSource::Management)),
        )
        .unwrap();
        assert_eq!(
            (both.ready, both.unacked, both.source),
            (7, Some(3), DepthSource::Management)
        );
        let passive = combine(
            Ok(depth(7, None, DepthSource::PassiveDeclare)),
            Err(BrokerError::Invalid("down".into())),
        )
        .unwrap();
        assert_eq!((passive.ready, passive.unacked), (7, None));
        let missing = combine(
            Err(BrokerError::QueueNotFound { queue: "q".into() }),
            Err(BrokerError::Invalid("down".into())),
        );
        assert!(matches!(missing, Err(BrokerError::QueueNotFound { .. })));
    }
}
