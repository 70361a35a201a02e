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

/// One queue as the management API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSummary {
    /// Queue name.
    pub name: String,
    /// Messages in it (ready and unacknowledged).
    pub messages: u64,
    /// Consumers.
    pub consumers: u64,
    /// When it was last used (`YYYY-MM-DD HH:MM:SS`, UTC), when idle.
    pub idle_since: Option<String>,
    /// Its `x-expires` argument, in milliseconds.
    pub expires_ms: Option<u64>,
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

/// Where the management API is, and whether credentials may go to it over plain HTTP.
#[derive(Clone, Debug, Default)]
pub struct ManagementTarget {
    /// Base URL (e.g. `https://rabbitmq:15671`); None: the AMQP host, `https://HOST:15671` for
    /// `amqps://`, `http://HOST:15672` for `amqp://`.
    pub url: Option<String>,
    /// Allow sending the credentials over plain HTTP to a host other than this machine.
    pub insecure_http: bool,
}

impl Management {
    /// A client for the API of `target`; credentials and vhost come from the AMQP settings. Plain
    /// HTTP to another machine is refused unless `target.insecure_http`, because every request
    /// carries the broker password.
    pub fn new(target: &ManagementTarget, settings: &AmqpSettings) -> Result<Self, BrokerError> {
        let uri = settings.uri()?;
        let tls = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
        let base = match &target.url {
            Some(b) => b.trim_end_matches('/').to_string(),
            None if tls => format!("https://{}:15671", uri.authority.host),
            None => format!("http://{}:15672", uri.authority.host),
        };
        let shown = crate::settings::redact(&base);
        let config =
            |detail: String| BrokerError::Config(format!("management API {shown}: {detail}"));
        let mut url = reqwest::Url::parse(&base).map_err(|e| config(format!("not a URL ({e})")))?;
        // Credentials come from the AMQP settings; any in the URL are dropped so none is printed.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(url.host_str()) || target.insecure_http => {}
            "http" => {
                return Err(config(format!(
                    "refusing to send RabbitMQ credentials in cleartext to {url}; use https:// \
                     (RabbitMQ serves the management API over TLS on 15671 when configured), or \
                     pass --insecure-management-http on a network you trust"
                )));
            }
            other => {
                return Err(config(format!(
                    "unsupported scheme {other}://; use https:// or http://"
                )));
            }
        }
        // Installing fails only when a provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = url.as_str().trim_end_matches('/').to_string();
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

    /// The broker's resource alarms, e.g. `memory alarm on rabbit@host`: while one is set, RabbitMQ
    /// blocks every publishing connection.
    pub async fn alarms(&self) -> Result<Vec<String>, BrokerError> {
        let nodes: Vec<serde_json::Value> = self
            .get_json("/api/nodes?columns=name,mem_alarm,disk_free_alarm")
            .await?;
        let mut alarms = Vec::new();
        for node in &nodes {
            let name = node["name"].as_str().unwrap_or("?");
            if node["mem_alarm"].as_bool() == Some(true) {
                alarms.push(format!("memory alarm on {name}"));
            }
            if node["disk_free_alarm"].as_bool() == Some(true) {
                alarms.push(format!("disk alarm on {name}"));
            }
        }
        Ok(alarms)
    }

    /// Every queue of the vhost whose name starts with `prefix`, with its size, consumers, when it
    /// was last used and its `x-expires`.
    pub async fn queues(&self, prefix: &str) -> Result<Vec<QueueSummary>, BrokerError> {
        let all: Vec<serde_json::Value> = self
            .get_json(&format!(
                "/api/queues/{}?columns=name,messages,consumers,idle_since,arguments",
                encode_path(&self.vhost)
            ))
            .await?;
        Ok(all
            .iter()
            .filter_map(|q| {
                let name = q["name"].as_str()?;
                name.starts_with(prefix).then(|| QueueSummary {
                    name: name.to_string(),
                    messages: q["messages"].as_u64().unwrap_or(0),
                    consumers: q["consumers"].as_u64().unwrap_or(0),
                    idle_since: q["idle_since"].as_str().map(String::from),
                    expires_ms: q["arguments"]["x-expires"].as_u64(),
                })
            })
            .collect())
    }

    /// Who consumes `queue`: each consumer's connection name (or peer address when unnamed).
    pub async fn consumer_connections(&self, queue: &str) -> Result<Vec<String>, BrokerError> {
        let path = format!(
            "/api/queues/{}/{}",
            encode_path(&self.vhost),
            encode_path(queue)
        );
        let q: serde_json::Value = self.get_json(&path).await?;
        let consumers = q["consumer_details"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut holders = Vec::new();
        for consumer in &consumers {
            if let Some(connection) = consumer["channel_details"]["connection_name"].as_str() {
                holders.push(self.describe_connection(connection).await);
            }
        }
        Ok(holders)
    }

    /// The connection that owns an exclusive queue, named as [`Management::consumer_connections`]
    /// names them; None when the queue is gone or has no owner.
    pub async fn queue_owner(&self, queue: &str) -> Option<String> {
        let path = format!(
            "/api/queues/{}/{}",
            encode_path(&self.vhost),
            encode_path(queue)
        );
        let q: serde_json::Value = self.get_json(&path).await.ok()?;
        let connection = q["owner_pid_details"]["name"].as_str()?.to_string();
        Some(self.describe_connection(&connection).await)
    }

    /// A connection's client-given name (e.g. `warren-wait@host-pid`, among its client
    /// properties) and its address.
    async fn describe_connection(&self, connection: &str) -> String {
        let details: Option<serde_json::Value> = self
            .get_json(&format!("/api/connections/{}", encode_path(connection)))
            .await
            .ok();
        let client_name = details
            .as_ref()
            .and_then(|d| d["client_properties"]["connection_name"].as_str());
        match client_name {
            Some(name) => format!("{name} ({connection})"),
            None => connection.to_string(),
        }
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
            .map_err(|e| fail(e.without_url().to_string()))?;
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

/// Whether a URL host (`host_str`, IPv6 in brackets) is this machine.
fn is_loopback(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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

/// Combines a passive declare (exact and immediate `ready` and `consumers`) with the management
/// API's figures (unacked and rates, refreshed every few seconds). Either alone will do; the
/// passive declare's error wins when both fail, as it says more about the queue itself.
pub fn combine(
    passive: Result<QueueDepth, BrokerError>,
    api: Result<QueueDepth, BrokerError>,
) -> Result<QueueDepth, BrokerError> {
    match (passive, api) {
        // What a passive declare reads is exact and current; the API's statistics lag by up to
        // their collection interval (5 s by default).
        (Ok(p), Ok(a)) => Ok(QueueDepth {
            ready: p.ready,
            consumers: p.consumers,
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
    fn ready_and_consumers_come_from_the_declare_and_the_rest_from_the_api() {
        let mut passive = depth(7, None, DepthSource::PassiveDeclare);
        // A worker that just started: the declare sees it, the API's statistics not yet.
        passive.consumers = 2;
        let both = combine(Ok(passive), Ok(depth(2, Some(3), DepthSource::Management))).unwrap();
        assert_eq!(
            (both.ready, both.consumers, both.unacked, both.source),
            (7, 2, Some(3), DepthSource::Management)
        );
        let passive = combine(
            Ok(depth(7, None, DepthSource::PassiveDeclare)),
            Err(BrokerError::Unavailable("down".into())),
        )
        .unwrap();
        assert_eq!((passive.ready, passive.unacked), (7, None));
        let missing = combine(
            Err(BrokerError::QueueNotFound { queue: "q".into() }),
            Err(BrokerError::Unavailable("down".into())),
        );
        assert!(matches!(missing, Err(BrokerError::QueueNotFound { .. })));
    }

    fn target(url: Option<&str>, insecure_http: bool) -> ManagementTarget {
        ManagementTarget {
            url: url.map(String::from),
            insecure_http,
        }
    }

    #[test]
    fn credentials_never_go_in_cleartext_to_another_machine() {
        let tls = AmqpSettings::new("amqps://u:pw@rabbit.example:5671/%2f");
        let api = Management::new(&target(None, false), &tls).unwrap();
        assert_eq!(api.base, "https://rabbit.example:15671");
        let err =
            Management::new(&target(Some("http://rabbit.example:15672"), false), &tls).unwrap_err();
        assert!(
            err.to_string().contains("--insecure-management-http"),
            "{err}"
        );
        let plain = AmqpSettings::new("amqp://u:pw@rabbit.example:5672/%2f");
        assert!(Management::new(&target(None, false), &plain).is_err());
        assert!(Management::new(&target(None, true), &plain).is_ok());
        for local in [
            "http://127.0.0.1:15672",
            "http://localhost:15672",
            "http://[::1]:15672",
        ] {
            assert!(
                Management::new(&target(Some(local), false), &plain).is_ok(),
                "{local}"
            );
        }
        // A password in the management URL is neither used nor shown.
        let err = Management::new(
            &target(Some("http://admin:hunter2@rabbit.example:15672"), false),
            &tls,
        )
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let api = Management::new(
            &target(Some("https://admin:hunter2@rabbit.example"), false),
            &tls,
        )
        .unwrap();
        assert!(!api.base.contains("hunter2"), "{}", api.base);
    }
}
