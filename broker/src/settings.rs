//! Where the broker is and how to log in: URL, password file, heartbeat.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::AMQPUri;

use crate::error::BrokerError;

/// Default broker URL: a local RabbitMQ with the guest account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Heartbeat interval asked of the broker unless the URL sets one: a dead peer is noticed within
/// about two intervals.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Largest AMQP frame asked of the broker unless the URL sets one: RabbitMQ's own default and
/// largest usual setting, so that any header block the broker accepted can be delivered (a message
/// whose headers do not fit one frame would close the connection, and every task in flight on it
/// would be redelivered). lapin sizes its buffers from this value but allocates them zeroed and
/// lazily, so an idle process does not pay for them.
pub const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// Longest wait for a connection to open: TCP, TLS and the AMQP handshake together. A port that
/// accepts connections and never answers would otherwise hang a process for ever.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection settings shared by every Warren process.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// `amqp://` or `amqps://` URL; may carry the password. Several nodes of a cluster are given
    /// comma-separated: full URLs, or `host:port` entries that take the scheme, user, password and
    /// vhost of the first (see [`AmqpSettings::addresses`]).
    pub url: String,
    /// File holding the password (e.g. a mounted Kubernetes Secret); overrides the URL's.
    pub password_file: Option<PathBuf>,
    /// Longest wait for a connection to open (TCP, TLS and AMQP handshake).
    pub connect_timeout: Duration,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self::new(DEFAULT_AMQP_URL)
    }
}

impl AmqpSettings {
    /// Settings for `url` with no password file.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// The URL with its password replaced by `***`, safe to log and to show in errors.
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(|a| redact(a.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The passwords written in the URL, as written (percent-encoded): what must not be left
    /// readable where the process's arguments and environment are shown.
    pub fn url_passwords(&self) -> Vec<String> {
        self.url
            .split(',')
            .filter_map(|entry| {
                let rest = entry.trim().split_once("://").map_or(entry, |(_, r)| r);
                let userinfo = &rest[..rest.rfind('@')?];
                let (_, password) = userinfo.split_once(':')?;
                (!password.is_empty()).then(|| password.to_string())
            })
            .collect()
    }

    /// The broker addresses, each a full URL: the comma-separated entries of the URL, where a
    /// `host:port` entry takes the scheme, user info, vhost and query of the first.
    pub fn addresses(&self) -> Vec<String> {
        let entries: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let Some(first) = entries.first() else {
            return vec![self.url.clone()];
        };
        // The parts of the first URL around its host and port.
        let (scheme, rest) = first.split_once("://").unwrap_or(("amqp", first));
        let userinfo = rest.rfind('@').map_or("", |at| &rest[..=at]);
        let after_userinfo = &rest[userinfo.len()..];
        let tail = after_userinfo
            .find(['/', '?'])
            .map_or("", |i| &after_userinfo[i..]);
        entries
            .iter()
            .map(|entry| {
                if entry.contains("://") {
                    entry.to_string()
                } else {
                    format!("{scheme}://{userinfo}{entry}{tail}")
                }
            })
            .collect()
    }

    /// Parses the first address, applies the password file and the default heartbeat.
    pub fn uri(&self) -> Result<AMQPUri, BrokerError> {
        let first = self.addresses().into_iter().next().unwrap_or_default();
        self.uri_of(&first)
    }

    /// Every address, parsed as [`AmqpSettings::uri`] does, with its redacted form for messages.
    pub fn uris(&self) -> Result<Vec<(AMQPUri, String)>, BrokerError> {
        self.addresses()
            .iter()
            .map(|a| Ok((self.uri_of(a)?, redact(a))))
            .collect()
    }

    fn uri_of(&self, address: &str) -> Result<AMQPUri, BrokerError> {
        let mut uri = AMQPUri::from_str(address).map_err(|e| {
            // The parser quotes the whole URL, password and all.
            let detail = e.replace(address, &redact(address));
            BrokerError::Config(format!(
                "invalid AMQP URL {}: {detail}. Expected amqp://user:password@host:5672/vhost \
                 (use %2f for the default vhost /; percent-encode '/', '?', '#' and '@' in the \
                 password, or use --amqp-password-file; several nodes: comma-separated)",
                redact(address)
            ))
        })?;
        if let Some(path) = &self.password_file {
            let password = std::fs::read_to_string(path).map_err(|e| {
                BrokerError::Config(format!(
                    "cannot read the AMQP password file {} (WARREN_AMQP_PASSWORD_FILE): {e}",
                    path.display()
                ))
            })?;
            // Secret files usually end with a newline that is not part of the password.
            uri.authority.userinfo.password = password.trim_end_matches(['\n', '\r']).to_string();
        }
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
        Ok(uri)
    }
}

/// A duration given as a number of seconds in a flag or a file's `field`: finite, and above zero
/// unless `zero_ok`. The one parser of durations for every Warren setting.
pub fn seconds(field: &str, value: f64, zero_ok: bool) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| zero_ok || !d.is_zero())
        .ok_or_else(|| {
            let what = if zero_ok { "non-negative" } else { "positive" };
            format!("{field} must be a {what} number of seconds, got {value}")
        })
}

/// Replaces the password of a URL's user info with `***`. The user info ends at the last `@`, so
/// a password holding unencoded `/`, `?`, `#` or `@` is hidden whole too.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // A `host:port` entry (a cluster's further nodes) holds no password; one with user info
        // (`user:password@host`) has it between the first ':' and the last '@'.
        return match url
            .rfind('@')
            .and_then(|at| Some((url[..at].split_once(':')?, at)))
        {
            Some(((user, _), at)) => format!("{user}:***{}", &url[at..]),
            None => url.to_string(),
        };
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &rest[at..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_addresses_share_the_first_ones_login_and_vhost() {
        let settings = AmqpSettings::new(
            "amqp://warren:s3cret@rabbit-0:5672/pipelines?heartbeat=5, rabbit-1:5672,amqps://other@x:5671/v",
        );
        assert_eq!(
            settings.addresses(),
            [
                "amqp://warren:s3cret@rabbit-0:5672/pipelines?heartbeat=5",
                "amqp://warren:s3cret@rabbit-1:5672/pipelines?heartbeat=5",
                "amqps://other@x:5671/v",
            ]
        );
        let uris = settings.uris().unwrap();
        assert_eq!(uris[1].0.authority.host, "rabbit-1");
        assert_eq!(uris[1].0.vhost, "pipelines");
        assert_eq!(
            uris[1].1,
            "amqp://warren:***@rabbit-1:5672/pipelines?heartbeat=5"
        );
        assert!(!settings.redacted_url().contains("s3cret"));
        assert_eq!(AmqpSettings::default().addresses(), [DEFAULT_AMQP_URL]);
    }

    #[test]
    fn the_passwords_in_a_url_are_found_as_written() {
        let settings = AmqpSettings::new("amqp://u:p%40ss@a:5672/%2f,b:5673,amqp://v:w@c");
        assert_eq!(settings.url_passwords(), ["p%40ss", "w"]);
        assert!(
            AmqpSettings::new("amqp://a:5672")
                .url_passwords()
                .is_empty()
        );
    }

    #[test]
    fn redaction_hides_only_the_password() {
        assert_eq!(
            redact("amqp://guest:s3cr%40t@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqps://u@host/v"), "amqps://u@host/v");
        assert_eq!(redact("amqp://host"), "amqp://host");
        assert_eq!(redact("not a url"), "not a url");
        assert_eq!(redact("guest:secret@host"), "guest:***@host");
        // A cluster's further nodes are printed as given: there is no password in them.
        assert_eq!(redact("127.0.0.1:5673"), "127.0.0.1:5673");
        assert_eq!(
            AmqpSettings::new("amqp://u:pw@a:5672/%2f,b:5673,c:5674").redacted_url(),
            "amqp://u:***@a:5672/%2f,b:5673,c:5674"
        );
        // Unencoded characters that end the authority elsewhere must not expose the password.
        for password in ["pa/ss", "pa?ss", "pa#ss", "p@ss", "a/b?c@d"] {
            let shown = redact(&format!("amqp://guest:{password}@host:5672/%2f"));
            assert_eq!(shown, "amqp://guest:***@host:5672/%2f", "{password}");
        }
    }

    #[test]
    fn password_file_overrides_url_and_heartbeat_defaults() {
        let dir = std::env::temp_dir().join(format!("warren-pw-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let settings = AmqpSettings {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            password_file: Some(dir.clone()),
            ..AmqpSettings::default()
        };
        let uri = settings.uri().unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(uri.authority.userinfo.password, "from-file");
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(uri.query.frame_max, Some(DEFAULT_FRAME_MAX));
        let chosen = AmqpSettings::new("amqp://h/%2f?frame_max=131072&heartbeat=30")
            .uri()
            .unwrap();
        assert_eq!(
            (chosen.query.frame_max, chosen.query.heartbeat),
            (Some(131072), Some(30))
        );
    }

    #[test]
    fn bad_url_and_missing_file_are_config_errors() {
        let err = AmqpSettings::new("http://x:y@host").uri().unwrap_err();
        assert!(
            err.is_fatal() && err.to_string().contains("x:***@host"),
            "{err}"
        );
        let err = AmqpSettings {
            url: DEFAULT_AMQP_URL.into(),
            password_file: Some("/nonexistent/pw".into()),
            ..AmqpSettings::default()
        }
        .uri()
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/pw"), "{err}");
    }
}
