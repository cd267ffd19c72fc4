//! qkdnet's quantum layer: **simulated** QKD optics and the models that
//! predict what a link yields.
//!
//! Nothing here touches real photons. Sources, channels, detectors and
//! eavesdroppers are models driven by physical parameters ([`device`]); the
//! event simulator ([`sim`]) produces what real hardware would: Alice's record of
//! what she sent and Bob's record of what he detected ([`record`], a documented,
//! versioned format that hardware output can replace). The analytic models
//! ([`keyrate`]) reproduce published results and are what the network planner
//! and the link reports compare against.
//!
//! This crate does no I/O of its own beyond encoding records into a caller's
//! writer, reads no clock, and draws all randomness from seeds it is given.

pub mod detection;
pub mod device;
pub mod entropy;
mod error;
pub mod keyrate;
pub mod photon;
pub mod preset;
pub mod record;
pub mod satellite;
pub mod sim;
pub mod units;

pub use error::OpticsError;
