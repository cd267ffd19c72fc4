//! The little of SDP (RFC 8866) the edge touches: where a party's audio goes,
//! and the same description pointing at the edge's relay instead, without
//! any `a=crypto` line (key material never crosses the edge in SIP).
//!
//! Line-based on purpose: every line the edge does not rewrite passes as it
//! came, so codecs, ptime and attributes the softphones agree on are theirs.

use std::net::{IpAddr, SocketAddr};

/// Why a body is not an SDP the edge can relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    /// Not UTF-8.
    #[error("SDP is not text")]
    NotText,
    /// No `m=audio` line, or no connection address for it.
    #[error("SDP has no audio stream with an address")]
    NoAudio,
    /// The SDP asks for something the edge does not relay (a second audio stream…).
    #[error("SDP not supported: {0}")]
    Unsupported(String),
}

/// The audio stream of a description: its address and whether it is SRTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audio {
    /// Where the party receives RTP (RTCP on the next port).
    pub rtp: SocketAddr,
    /// The transport of the m-line (`RTP/AVP`, `RTP/SAVP`…).
    pub proto: String,
}

fn conn_addr(line: &str) -> Option<IpAddr> {
    // c=IN IP4 127.0.0.1[/ttl]
    let rest = line.strip_prefix("c=")?;
    let mut it = rest.split_whitespace();
    let (_net, _ty, addr) = (it.next()?, it.next()?, it.next()?);
    addr.split('/').next()?.parse().ok()
}

/// The (single) audio stream of `body`.
pub fn audio(body: &[u8]) -> Result<Audio, SdpError> {
    let text = std::str::from_utf8(body).map_err(|_| SdpError::NotText)?;
    let mut session_c = None;
    let mut found: Option<(u16, String, Option<IpAddr>)> = None;
    let mut in_audio = false;
    let mut in_session = true;
    let mut audio_lines = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            let mut it = m.split_whitespace();
            let (kind, port, proto) = (it.next(), it.next(), it.next());
            in_session = false;
            in_audio = kind == Some("audio");
            if in_audio {
                audio_lines += 1;
                let port: u16 = port
                    .and_then(|p| p.split('/').next())
                    .and_then(|p| p.parse().ok())
                    .ok_or(SdpError::NoAudio)?;
                found = Some((port, proto.unwrap_or("RTP/AVP").to_owned(), None));
            }
        } else if line.starts_with("c=") {
            // Session level (before any m=), or the audio section's own;
            // another section's c= is that section's.
            match (&mut found, in_audio) {
                (Some(f), true) => f.2 = conn_addr(line),
                _ if in_session => session_c = conn_addr(line),
                _ => {}
            }
        }
    }
    if audio_lines > 1 {
        return Err(SdpError::Unsupported("more than one audio stream".into()));
    }
    let (port, proto, c) = found.ok_or(SdpError::NoAudio)?;
    let ip = c.or(session_c).ok_or(SdpError::NoAudio)?;
    Ok(Audio {
        rtp: SocketAddr::new(ip, port),
        proto,
    })
}

/// `body` with its audio stream pointed at `relay` (connection lines and the
/// m-line's port), the transport set to `proto` and every `a=crypto` and
/// `a=rtcp:` line removed; other lines unchanged.
pub fn rewrite(body: &[u8], relay: SocketAddr, proto: &str) -> Result<Vec<u8>, SdpError> {
    rewrite_with(body, relay, proto, None)
}

/// [`rewrite`], and `add` (an attribute line such as the edge's own
/// `a=crypto`) placed right after the audio m-line.
pub fn rewrite_with(
    body: &[u8],
    relay: SocketAddr,
    proto: &str,
    add: Option<&str>,
) -> Result<Vec<u8>, SdpError> {
    let text = std::str::from_utf8(body).map_err(|_| SdpError::NotText)?;
    let (family, ip) = match relay.ip() {
        IpAddr::V4(a) => ("IP4", a.to_string()),
        IpAddr::V6(a) => ("IP6", a.to_string()),
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.trim_end();
        if line.starts_with("a=crypto:") || line.starts_with("a=rtcp:") {
            continue;
        }
        if line.starts_with("c=") {
            out.push_str(&format!("c=IN {family} {ip}\r\n"));
            continue;
        }
        if let Some(m) = line.strip_prefix("m=audio ") {
            let mut it = m.split_whitespace();
            let _port = it.next();
            let _proto = it.next();
            let fmts: Vec<&str> = it.collect();
            out.push_str(&format!(
                "m=audio {} {proto} {}\r\n",
                relay.port(),
                fmts.join(" ")
            ));
            if let Some(a) = add {
                out.push_str(a);
                out.push_str("\r\n");
            }
            continue;
        }
        if let Some(o) = line.strip_prefix("o=") {
            // o=user id version IN IP4 addr: the origin's address is the edge's now.
            let f: Vec<&str> = o.split_whitespace().collect();
            if f.len() == 6 {
                out.push_str(&format!(
                    "o={} {} {} IN {family} {ip}\r\n",
                    f[0], f[1], f[2]
                ));
                continue;
            }
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    Ok(out.into_bytes())
}
