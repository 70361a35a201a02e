//! Errors talking to RabbitMQ, each worded to say what to check.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// An error from the broker layer.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker's TLS certificate is not trusted.
    #[error(
        "RabbitMQ at {url} presented a certificate this machine does not trust: {source}. For a \
         private CA, set SSL_CERT_FILE to its PEM file (or add it to the system's trust store)"
    )]
    UntrustedCertificate {
        /// The URL, password redacted.
        url: String,
        /// What the TLS layer reported.
        source: lapin::Error,
    },
    /// The connection could not be opened or was lost.
    #[error(
        "cannot reach RabbitMQ at {url}: {source}. Check that the broker is running and reachable \
         from here (host, port, TLS for amqps://), and the --amqp-url / WARREN_AMQP_URL setting"
    )]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// What lapin reported.
        source: lapin::Error,
    },
    /// Opening the connection took longer than the connect timeout.
    #[error(
        "RabbitMQ at {url} did not complete the connection within {after:?}: something accepted \
         the TCP connection but no AMQP handshake followed. Check the host and port (the AMQP \
         port, usually 5672 or 5671 for amqps://, not the management port), TLS for amqps://, \
         and --connect-timeout for a slow network. A broker out of file handles also accepts \
         and never answers: RabbitMQ needs an open-file limit of 65536 (see the README's \
         'Running RabbitMQ')"
    )]
    ConnectTimeout {
        /// The URL, password redacted.
        url: String,
        /// The timeout that expired.
        after: std::time::Duration,
    },
    /// The broker refused the credentials or the virtual host.
    #[error(
        "RabbitMQ at {url} refused the login: {detail}. Check the user name and password \
         (WARREN_AMQP_PASSWORD_FILE if set) and that the user may access the virtual host"
    )]
    AccessRefused {
        /// The URL, password redacted.
        url: String,
        /// What the broker said.
        detail: String,
    },
    /// A queue exists with other arguments than Warren declares.
    #[error(
        "queue '{queue}' exists with different settings than Warren's ({detail}). It was probably \
         created by another tool or an incompatible Warren version; delete it or use another --queue"
    )]
    QueueMismatch {
        /// Queue name.
        queue: String,
        /// What the broker said.
        detail: String,
    },
    /// A submitter was asked to publish to a task queue nobody declared (a mistyped name, most
    /// often), and not to create it.
    #[error(
        "task queue '{queue}' does not exist, so no worker or autoscaler serves it: check the name \
         (`warren status` lists the task queues), or pass --create-queue to create it and submit anyway"
    )]
    TaskQueueMissing {
        /// Queue name.
        queue: String,
    },
    /// A queue that one consumer at a time may read still has one, perhaps this process's own
    /// lost connection that the broker has not noticed yet: worth retrying.
    #[error(
        "queue '{queue}' is still consumed by another connection (perhaps this process's lost one)"
    )]
    QueueBusy {
        /// Queue name.
        queue: String,
    },
    /// None of several broker addresses (a cluster's nodes) could be reached.
    #[error("cannot reach any of the RabbitMQ nodes given: {}", failures.join("; "))]
    NoNodeReachable {
        /// Why each address failed.
        failures: Vec<String>,
    },
    /// A queue that must exist does not.
    #[error("queue '{queue}' does not exist (never created, already collected, or expired)")]
    QueueNotFound {
        /// Queue name.
        queue: String,
    },
    /// A queue exists but cannot be used now: its members are on nodes that are down (a quorum
    /// queue without a majority, or whose leader is gone). It comes back when they do.
    #[error(
        "queue '{queue}' is unavailable: it has lost its quorum (a majority of its RabbitMQ nodes \
         are down or unreachable) and comes back when they return ({detail})"
    )]
    QueueUnavailable {
        /// Queue name.
        queue: String,
        /// What the broker said.
        detail: String,
    },
    /// The broker cancelled a consumer, usually because its queue was deleted; declaring the
    /// queue again and consuming anew recovers.
    #[error("RabbitMQ cancelled the consumer of '{queue}' (was the queue deleted?)")]
    ConsumerCancelled {
        /// Queue name.
        queue: String,
    },
    /// A mandatory publish could not be routed to any queue.
    #[error(
        "message to '{routing_key}' was returned by RabbitMQ ({reply}): the queue does not exist"
    )]
    Unroutable {
        /// Routing key (queue name) of the publish.
        routing_key: String,
        /// Reply text from the broker.
        reply: String,
    },
    /// The broker refused to take responsibility for a message.
    #[error(
        "RabbitMQ did not accept the message to '{routing_key}' (publisher confirm was a nack: \
         the queue may have lost its quorum while nodes are down, or be full)"
    )]
    Nacked {
        /// Routing key (queue name) of the publish.
        routing_key: String,
    },
    /// The broker kept refusing a publish for the whole retry budget.
    #[error(
        "RabbitMQ refused every publish to '{routing_key}' for {after:?} (last: {last}); the queue \
         may have lost its quorum (nodes down) or be full"
    )]
    Refused {
        /// Routing key (queue name) of the publish.
        routing_key: String,
        /// The budget that ran out.
        after: std::time::Duration,
        /// The last refusal.
        last: String,
    },
    /// The broker refused this user an operation on a queue or exchange: its permissions (the
    /// configure, write and read patterns of the vhost) do not cover it. Retrying cannot help.
    #[error(
        "RabbitMQ refused the operation: {0}. The user's permissions in this vhost (configure, \
         write and read patterns) do not cover it; see the README's 'Roles and permissions' for \
         what each Warren role needs"
    )]
    PermissionDenied(String),
    /// Any other AMQP failure, usually a lost channel or connection.
    #[error("AMQP error: {0}")]
    Amqp(lapin::Error),
    /// Configuration that cannot work (bad URL, unreadable password file).
    #[error("{0}")]
    Config(String),
    /// Input Warren cannot go on with: a name AMQP cannot carry, a task file that changed while
    /// it was submitted, a batch's queue deleted under it. Fixing the input is the only way on.
    #[error("{0}")]
    InvalidInput(String),
    /// Something that cannot happen did: a Warren bug, reported rather than panicking.
    #[error("{0} (a Warren bug: please report it)")]
    Bug(String),
    /// A source of figures is not there (no management API configured, a failed connection kept
    /// for the message); callers fall back to another source.
    #[error("{0}")]
    Unavailable(String),
    /// A publish was not confirmed within the time given; the broker may still take it.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    /// The management HTTP API failed.
    #[error("RabbitMQ management API at {url}: {detail}")]
    Management {
        /// Base URL of the API.
        url: String,
        /// What went wrong.
        detail: String,
    },
}

impl From<lapin::Error> for BrokerError {
    fn from(error: lapin::Error) -> Self {
        // ACCESS_REFUSED on a channel is a permission the user lacks (an exclusive consume that
        // another process holds is told apart where it can happen, with `is_access_refused`).
        if is_access_refused(&error) {
            BrokerError::PermissionDenied(error.to_string())
        } else {
            BrokerError::Amqp(error)
        }
    }
}

impl BrokerError {
    /// Whether retrying cannot help: configuration, credentials or topology must be fixed first.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            BrokerError::AccessRefused { .. }
                | BrokerError::TaskQueueMissing { .. }
                | BrokerError::UntrustedCertificate { .. }
                | BrokerError::QueueMismatch { .. }
                | BrokerError::Config(_)
                | BrokerError::InvalidInput(_)
                | BrokerError::Bug(_)
                | BrokerError::PermissionDenied(_)
        )
    }

    /// Maps an error of a queue operation, naming the queue.
    pub fn from_queue_error(queue: &str, error: lapin::Error) -> Self {
        match amqp_kind(&error) {
            Some(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)) => {
                BrokerError::QueueMismatch {
                    queue: queue.to_string(),
                    detail: error.to_string(),
                }
            }
            Some(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) => BrokerError::QueueNotFound {
                queue: queue.to_string(),
            },
            // RabbitMQ answers an operation on a quorum queue without a majority with
            // INTERNAL_ERROR (`nodedown`, or a timeout after about 65 s), closing the connection.
            Some(AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR)) => {
                BrokerError::QueueUnavailable {
                    queue: queue.to_string(),
                    detail: error.to_string(),
                }
            }
            _ if error.to_string().contains("nodedown") => BrokerError::QueueUnavailable {
                queue: queue.to_string(),
                detail: error.to_string(),
            },
            _ => BrokerError::from(error),
        }
    }

    /// Maps an error of opening a connection to `url` (already redacted).
    pub fn from_connect_error(url: &str, error: lapin::Error) -> Self {
        let text = error.to_string();
        let refused = matches!(
            amqp_kind(&error),
            Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
                | Some(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED))
        ) || text.contains("ACCESS_REFUSED")
            || text.contains("NOT_ALLOWED");
        if refused {
            BrokerError::AccessRefused {
                url: url.to_string(),
                detail: text,
            }
        } else if text.contains("certificate") {
            BrokerError::UntrustedCertificate {
                url: url.to_string(),
                source: error,
            }
        } else {
            BrokerError::Connect {
                url: url.to_string(),
                source: error,
            }
        }
    }
}

/// True when the broker answered `error`'s operation with ACCESS_REFUSED (for a consume: another
/// process holds the queue).
pub fn is_access_refused(error: &lapin::Error) -> bool {
    matches!(
        amqp_kind(error),
        Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
    )
}

/// The AMQP reply kind inside a lapin error, when the broker sent one.
pub fn amqp_kind(error: &lapin::Error) -> Option<&AMQPErrorKind> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.kind()),
        _ => None,
    }
}
