//! qkdnet applications (work in progress).
#![warn(missing_docs)]
