//! Quantum layer (simulated).
