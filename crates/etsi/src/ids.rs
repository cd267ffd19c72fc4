//! SAE and KME identifiers.
//!
//! ETSI GS QKD 014 leaves ID formats to the implementation and only asks that they
//! be unique in the network. IDs appear in URL paths, certificates, SQL rows and
//! logs, so qkdnet restricts them once, here, to a conservative alphabet
//! (`A-Z a-z 0-9 . _ -`, 1 to 64 characters): every other module holds a value that
//! is already known to be safe in all those places ("parse, don't validate").

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::EtsiError;

/// Longest accepted identifier, in bytes.
pub const MAX_ID_LEN: usize = 64;

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A validated ", $what, " identifier.")]
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Parses a ", $what, " identifier.")]
            pub fn new(s: &str) -> Result<Self, EtsiError> {
                if valid_id(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(EtsiError::InvalidId { what: $what })
                }
            }

            /// The identifier as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(SaeId, "SAE");
id_type!(KmeId, "KME");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_restricted() {
        assert!(SaeId::new("sae-1.a_b").is_ok());
        assert!(SaeId::new("").is_err());
        assert!(SaeId::new("a/b").is_err());
        assert!(SaeId::new("a b").is_err());
        assert!(KmeId::new(&"x".repeat(65)).is_err());
        assert!(KmeId::new(&"x".repeat(64)).is_ok());
    }
}
