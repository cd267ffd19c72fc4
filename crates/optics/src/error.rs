//! The optics crate's one error type.
//!
//! Everything that reaches this crate from outside (a TOML preset, a record
//! file, a command-line override) is checked and reported here; nothing panics.

/// Errors from building devices, parsing presets and records, or running models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpticsError {
    /// A parameter is outside its physical range or inconsistent with another.
    #[error("invalid {what}: {reason}")]
    InvalidParameter {
        /// The parameter or quantity concerned.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No preset of that name is built in.
    #[error("unknown preset '{name}' (available: {available})")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The built-in preset names, comma-separated.
        available: String,
    },
    /// A device/preset TOML document could not be parsed.
    #[error("cannot parse device configuration: {0}")]
    Config(String),
    /// A detection-record file is malformed, truncated or of an unknown version.
    #[error("bad detection record: {0}")]
    Record(String),
    /// A model has no positive key for these parameters (not an error of the
    /// caller: the link simply cannot produce key).
    #[error("no positive key: {0}")]
    NoKey(String),
    /// Reading or writing a record stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl OpticsError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
