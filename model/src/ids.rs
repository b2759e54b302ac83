//! Device and patient identifiers.
//!
//! Identifiers appear in MQTT topics (`wardflow/v1/devices/{id}/readings`),
//! file names and logs, so they are restricted to a conservative alphabet:
//! ASCII letters, digits, `-`, `_`, `.` and `:`, 1 to 64 bytes. That rules out
//! the MQTT topic separators and wildcards (`/`, `+`, `#`, MQTT 3.1.1 §4.7)
//! and anything a shell or a path would interpret.
//!
//! Ids are stored inline (no heap allocation) up to 24 bytes.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id is {len} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} id {id:?} contains {ch:?}; allowed are ASCII letters, digits and - _ . :")]
    BadChar {
        kind: &'static str,
        id: String,
        ch: char,
    },
}

fn check(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len: s.len() });
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(IdError::BadChar {
            kind,
            id: s.to_string(),
            ch,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(CompactString);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: &str) -> Result<Self, IdError> {
                check($kind, s)?;
                Ok(Self(CompactString::new(s)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                self.as_str()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A registered device: a bedside monitor, a wearable, a pump.
    DeviceId,
    "device"
);
id_type!(
    /// A patient, as the hospital identifies them to Wardflow (an opaque
    /// pseudonym is preferred to a medical record number).
    PatientId,
    "patient"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["bed-12", "mon_3.a", "urn:dev:mac:0024befffe804ff1", "x"] {
            assert_eq!(DeviceId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_topic_separators_and_wildcards() {
        for bad in ["a/b", "a+", "#", "a b", "é"] {
            let err = DeviceId::new(bad).unwrap_err();
            assert!(matches!(err, IdError::BadChar { .. }), "{bad}: {err}");
        }
        assert_eq!(
            PatientId::new("").unwrap_err(),
            IdError::Empty { kind: "patient" }
        );
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(matches!(
            PatientId::new(&long).unwrap_err(),
            IdError::TooLong { len: 65, .. }
        ));
    }

    #[test]
    fn deserializing_validates() {
        let id: DeviceId = serde_json::from_str("\"mon-1\"").unwrap();
        assert_eq!(id.as_str(), "mon-1");
        let err = serde_json::from_str::<DeviceId>("\"mon/1\"").unwrap_err();
        assert!(err.to_string().contains("contains '/'"), "{err}");
    }
}
