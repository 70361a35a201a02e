//! Reading an envelope: the size and version checks made before the envelope itself, and the
//! errors that name what is wrong (each a dead-letter reason).

use serde::Deserialize;
use serde_json::Value;

use super::{ErrorKind, MAX_ID_LEN, PROTOCOL_VERSION};

/// Why bytes could not be turned into an envelope. Each variant names a dead-letter reason.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is larger than the reader accepts.
    #[error("message of {size} bytes is larger than the limit of {limit} bytes")]
    Oversize {
        /// Body size in bytes.
        size: usize,
        /// Accepted maximum.
        limit: usize,
    },
    /// The envelope names a version this reader does not speak.
    #[error(
        "envelope version {found} is not supported (this worker speaks version {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion {
        /// Version found in the header or envelope.
        found: String,
    },
    /// A required field is absent.
    #[error("envelope is missing a field: {0}")]
    MissingField(String),
    /// The bytes are not a MessagePack envelope of the expected shape.
    #[error("body is not a valid MessagePack envelope: {0}")]
    Undecodable(String),
    /// A field is present but its value is not acceptable.
    #[error("invalid field: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// Short machine-readable kind, used as error kind and dead-letter reason.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DecodeError::Oversize { .. } => ErrorKind::Oversize,
            DecodeError::UnsupportedVersion { .. } => ErrorKind::UnsupportedVersion,
            DecodeError::MissingField(_) => ErrorKind::MissingField,
            DecodeError::Undecodable(_) => ErrorKind::Undecodable,
            DecodeError::Invalid(_) => ErrorKind::InvalidField,
        }
    }
}

/// Checks that `value` can serve as a task or batch id.
pub fn validate_id(field: &str, value: &str) -> Result<(), DecodeError> {
    if value.is_empty() {
        return Err(DecodeError::Invalid(format!("{field} is empty")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(DecodeError::Invalid(format!(
            "{field} is {} bytes long; at most {MAX_ID_LEN} are allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(DecodeError::Invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// What is read of an envelope before the envelope itself: that it is a map with string keys
/// (integer keys would be read positionally, as serde reads a struct from an array), its version
/// (so a newer envelope is reported as a version problem rather than a shape error), and which
/// fields are nil.
#[derive(Default)]
struct Probe {
    /// `None`: no `v`; `Some(None)`: `v` is nil.
    v: Option<Option<Value>>,
    nil: Vec<String>,
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ProbeVisitor)
    }
}

struct ProbeVisitor;

impl<'de> serde::de::Visitor<'de> for ProbeVisitor {
    type Value = Probe;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map with string keys (an envelope)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
        let mut probe = Probe::default();
        while let Some(key) = map.next_key::<StringKey>()? {
            if key.0 == "v" {
                probe.v = Some(map.next_value::<Option<Value>>()?);
            } else if map.next_value::<Option<serde::de::IgnoredAny>>()?.is_none() {
                probe.nil.push(key.0);
            }
        }
        Ok(probe)
    }
}

/// A map key that must be a string.
struct StringKey(String);

impl<'de> Deserialize<'de> for StringKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = StringKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string map key (the envelope's keys are field names)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StringKey, E> {
                Ok(StringKey(v.to_string()))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Decodes an envelope of at most `limit` bytes; nil in any of `required` (fields that serde reads
/// as optional but the protocol requires) is `invalid_field`, as for every other required field.
pub(super) fn decode_checked<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
    required: &[&str],
) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::Oversize {
            size: bytes.len(),
            limit,
        });
    }
    let probe: Probe =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    match probe.v {
        None => return Err(DecodeError::MissingField("v".into())),
        Some(None) => {
            return Err(DecodeError::Invalid(
                "v: nil is not accepted in a required field".into(),
            ));
        }
        Some(Some(Value::Number(n))) if n.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(Some(other)) => {
            return Err(DecodeError::UnsupportedVersion {
                found: other.to_string(),
            });
        }
    }
    for field in required {
        if probe.nil.iter().any(|n| n == field) {
            return Err(DecodeError::Invalid(format!(
                "{field}: nil is not accepted in a required field"
            )));
        }
    }
    let mut reader = rmp_serde::Deserializer::from_read_ref(bytes);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let text = e.inner().to_string();
        if let Some(field) = text.strip_prefix("missing field ") {
            return DecodeError::MissingField(field.trim_matches('`').to_string());
        }
        let at_root = e.path().iter().next().is_none();
        match e.inner() {
            // A value of the wrong type (or out of range) in a named field.
            rmp_serde::decode::Error::TypeMismatch(marker) if !at_root => {
                DecodeError::Invalid(format!(
                    "{}: a value of the wrong type (MessagePack {marker:?})",
                    e.path()
                ))
            }
            rmp_serde::decode::Error::Syntax(_) | rmp_serde::decode::Error::OutOfRange
                if !at_root =>
            {
                DecodeError::Invalid(format!("{}: {text}", e.path()))
            }
            // Not MessagePack, truncated, too deeply nested, or not a map at all.
            _ => DecodeError::Undecodable(text),
        }
    })
}
