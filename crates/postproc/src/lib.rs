//! QKD post-processing kernels: sifting, parameter estimation, reconciliation,
//! verification, privacy amplification and Wegman–Carter authentication.
//!
//! Pure numerics: no I/O, no clock, no async. The protocol state machines that
//! drive these kernels between two parties live in the `link` layer.
