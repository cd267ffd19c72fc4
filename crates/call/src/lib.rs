//! Quantum secret calls: the edge that runs beside an unmodified softphone as
//! its outbound SIP proxy and RTP relay, and keys each call from the key
//! service of quantum security media (`qkdnet-terminal`).
//!
//! | module | what |
//! |---|---|
//! | [`sip`] | SIP messages: parse, headers, encode (sans-IO, fuzzed) |
//! | [`sdp`] | the audio stream of an SDP, and the SDP pointed at the relay |
//! | [`media`] | `sm4` mode: RTP/RTCP under SM4-GCM with replay window (sans-IO) |
//! | [`message`] | SIP MESSAGE bodies sealed with SM4-GCM under a per-message session key (sans-IO) |
//! | [`otp`] | `otp` mode: RTP/RTCP under a one-time pad of QKD keys with a Wegman–Carter MAC; pad announcements (sans-IO) |
//! | [`rekey`] | `sm4` rekeying during a call: in-band offer and ack naming a new key-service session (sans-IO) |
//! | [`srtp`] | `srtp` mode: SRTP/SRTCP `AES_CM_128_HMAC_SHA1_80` (RFC 3711), SDES key lines (sans-IO) |
//! | [`edge`] | the running edge: proxy, key step, relay, call reports |

#![warn(missing_docs)]

pub mod edge;
pub mod media;
pub mod message;
pub mod otp;
pub mod rekey;
pub mod sdp;
pub mod sip;
pub mod srtp;
