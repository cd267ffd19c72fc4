//! Validated physical quantities.
//!
//! "Parse, don't validate": a value that is out of its physical range cannot be
//! constructed, so every model downstream can rely on it. The newtypes implement
//! `TryFrom<f64>` and deserialize through it, so a TOML file with
//! `efficiency = 1.5` fails at parse time with a message naming the bound.

use serde::{Deserialize, Serialize};

use crate::OpticsError;

macro_rules! checked_f64 {
    ($(#[$doc:meta])* $name:ident, $check:expr, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
        #[serde(try_from = "f64", into = "f64")]
        pub struct $name(f64);

        impl $name {
            /// Checks the range and wraps the value.
            pub fn new(v: f64) -> Result<Self, OpticsError> {
                let ok: fn(f64) -> bool = $check;
                if v.is_finite() && ok(v) {
                    Ok(Self(v))
                } else {
                    Err(OpticsError::invalid(stringify!($name), format!("must be {}, got {v}", $what)))
                }
            }
            /// The plain value.
            pub fn get(self) -> f64 {
                self.0
            }
        }

        impl TryFrom<f64> for $name {
            type Error = OpticsError;
            fn try_from(v: f64) -> Result<Self, OpticsError> {
                Self::new(v)
            }
        }

        impl From<$name> for f64 {
            fn from(v: $name) -> f64 {
                v.0
            }
        }
    };
}

checked_f64!(
    /// A probability in [0, 1].
    Probability,
    |v| (0.0..=1.0).contains(&v),
    "a probability in [0, 1]"
);
checked_f64!(
    /// A finite, non-negative quantity (lengths, losses in dB, times, photon numbers).
    NonNegative,
    |v| v >= 0.0,
    "finite and >= 0"
);
checked_f64!(
    /// A finite, strictly positive quantity (rates, sizes).
    Positive,
    |v| v > 0.0,
    "finite and > 0"
);

/// Converts a loss in dB to a transmittance in (0, 1].
pub fn db_to_transmittance(db: f64) -> f64 {
    10f64.powf(-db / 10.0)
}

/// Converts a transmittance in (0, 1] to a loss in dB.
pub fn transmittance_to_db(t: f64) -> f64 {
    -10.0 * t.log10()
}
