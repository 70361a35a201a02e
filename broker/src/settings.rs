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
    /// `amqp://` or `amqps://` URL; may carry the password.
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
        redact(&self.url)
    }

    /// Parses the URL, applies the password file and the default heartbeat.
    pub fn uri(&self) -> Result<AMQPUri, BrokerError> {
        let mut uri = AMQPUri::from_str(&self.url).map_err(|e| {
            // The parser quotes the whole URL, password and all.
            let detail = e.replace(&self.url, &self.redacted_url());
            BrokerError::Config(format!(
                "invalid AMQP URL {}: {detail}. Expected amqp://user:password@host:5672/vhost \
                 (use %2f for the default vhost /; percent-encode '/', '?', '#' and '@' in the \
                 password, or use --amqp-password-file)",
                self.redacted_url()
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

/// Replaces the password of a URL's user info with `***`. The user info ends at the last `@`, so
/// a password holding unencoded `/`, `?`, `#` or `@` is hidden whole too.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL: where a password would be cannot be told, so hide all after the first ':'.
        return match url.split_once(':') {
            Some((head, _)) => format!("{head}:***"),
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
    fn redaction_hides_only_the_password() {
        assert_eq!(
            redact("amqp://guest:s3cr%40t@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqps://u@host/v"), "amqps://u@host/v");
        assert_eq!(redact("amqp://host"), "amqp://host");
        assert_eq!(redact("not a url"), "not a url");
        assert_eq!(redact("guest:secret@host"), "guest:***");
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
