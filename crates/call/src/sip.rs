//! SIP messages (RFC 3261) as the edge needs them: parse, inspect and change
//! headers, encode; sans-IO.
//!
//! Written here rather than taken from a crate: the edge is a proxy, so it
//! must pass every header it does not understand through untouched and in
//! order, and change only Via, Route, Record-Route, Max-Forwards, its own
//! `X-QKD-*` headers and the body; the Rust SIP crates we looked at rebuild
//! messages from typed models, are not kept up, or both. What is here is
//! small: the start line, headers as ordered (name, value) pairs with
//! folding and compact names understood, and the body by `Content-Length`.
//!
//! Every input is untrusted (a UDP datagram from anyone who can reach the
//! port): sizes are bounded ([`MAX_MESSAGE`], [`MAX_HEADERS`]) and every
//! failure is a [`SipError`], never a panic (fuzz target `call_sip`).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

/// Largest message accepted (a UDP datagram; RFC 3261 §18.1.1 keeps
/// requests well under this).
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Most header fields in one message.
pub const MAX_HEADERS: usize = 128;

/// Why bytes are not a SIP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SipError {
    /// Larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is larger than {MAX_MESSAGE}")]
    TooLarge(usize),
    /// Not UTF-8 in the start line or headers.
    #[error("headers are not UTF-8")]
    NotText,
    /// The start line is neither a request line nor a status line.
    #[error("bad start line: {0}")]
    StartLine(String),
    /// A header line without a colon, or too many headers.
    #[error("bad header: {0}")]
    Header(String),
    /// The body is shorter than `Content-Length` says.
    #[error("body of {got} bytes, Content-Length says {want}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// A header the edge needs is missing or malformed.
    #[error("missing or bad {0} header")]
    Missing(&'static str),
}

/// A request line or a status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// `METHOD uri SIP/2.0`
    Request {
        /// The method (`INVITE`, `ACK`, …).
        method: String,
        /// The Request-URI.
        uri: String,
    },
    /// `SIP/2.0 code reason`
    Response {
        /// Status code.
        code: u16,
        /// Reason phrase.
        reason: String,
    },
}

/// A SIP message: start line, header fields in order, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Request or status line.
    pub start: StartLine,
    /// Header fields in order, names as they came.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` is recomputed by [`Message::encode`]).
    pub body: Vec<u8>,
}

/// The long name of a compact header name (RFC 3261 §7.3.3), else the name.
fn long_name(name: &str) -> &str {
    match name {
        "v" | "V" => "Via",
        "f" | "F" => "From",
        "t" | "T" => "To",
        "i" | "I" => "Call-ID",
        "m" | "M" => "Contact",
        "l" | "L" => "Content-Length",
        "c" | "C" => "Content-Type",
        "k" | "K" => "Supported",
        "s" | "S" => "Subject",
        _ => name,
    }
}

fn same_name(a: &str, b: &str) -> bool {
    long_name(a).eq_ignore_ascii_case(long_name(b))
}

/// Parses one message (a whole UDP datagram).
pub fn parse(bytes: &[u8]) -> Result<Message, SipError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(SipError::TooLarge(bytes.len()));
    }
    // The headers end at the first blank line, CRLF or bare LF: taking a
    // later CRLF one would read part of the body as headers.
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = bytes
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let split = match (crlf, lf) {
        (Some(c), Some(l)) => Some(if l.0 < c.0 { l } else { c }),
        (c, l) => c.or(l),
    }
    .ok_or_else(|| SipError::Header("no blank line after the headers".into()))?;
    let head = std::str::from_utf8(&bytes[..split.0]).map_err(|_| SipError::NotText)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let start = parse_start(first)?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            // Folded continuation of the previous header.
            let last = headers
                .last_mut()
                .ok_or_else(|| SipError::Header("continuation before any header".into()))?;
            let more = line.trim();
            if !more.is_empty() {
                if !last.1.is_empty() {
                    last.1.push(' ');
                }
                last.1.push_str(more);
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| SipError::Header(clip(line)))?;
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SipError::Header(clip(line)));
        }
        if headers.len() == MAX_HEADERS {
            return Err(SipError::Header(format!("more than {MAX_HEADERS} headers")));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let rest = &bytes[split.1..];
    let want = match headers.iter().find(|(n, _)| same_name(n, "Content-Length")) {
        Some((_, v)) => v
            .parse::<usize>()
            .map_err(|_| SipError::Missing("Content-Length"))?,
        None => rest.len(),
    };
    if rest.len() < want {
        return Err(SipError::Truncated {
            got: rest.len(),
            want,
        });
    }
    Ok(Message {
        start,
        headers,
        body: rest[..want].to_vec(),
    })
}

fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

fn parse_start(line: &str) -> Result<StartLine, SipError> {
    let bad = || SipError::StartLine(clip(line));
    if let Some(rest) = line.strip_prefix("SIP/2.0 ") {
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let code: u16 = code.parse().map_err(|_| bad())?;
        if !(100..700).contains(&code) {
            return Err(bad());
        }
        return Ok(StartLine::Response {
            code,
            reason: reason.to_owned(),
        });
    }
    let mut it = line.split(' ');
    let (Some(method), Some(uri), Some("SIP/2.0"), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || uri.is_empty() {
        return Err(bad());
    }
    Ok(StartLine::Request {
        method: method.to_owned(),
        uri: uri.to_owned(),
    })
}

/// Splits a header value at the commas that separate its elements (not those
/// inside `<…>` or quotes).
pub fn split_elements(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => depth += 1,
            '>' if !quoted => depth -= 1,
            ',' if !quoted && depth <= 0 => {
                out.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

impl Message {
    /// A request (no headers yet).
    pub fn request(method: &str, uri: &str) -> Self {
        Self {
            start: StartLine::Request {
                method: method.into(),
                uri: uri.into(),
            },
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// The method of a request, or of the request a response answers (CSeq).
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => self.cseq().map(|(_, m)| m),
        }
    }

    /// The status code of a response.
    pub fn code(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// The first value of header `name` (compact forms understood).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| same_name(n, name))
            .map(|(_, v)| v.as_str())
    }

    /// Every element of header `name`, across repeated fields and commas.
    pub fn elements(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| same_name(n, name))
            .flat_map(|(_, v)| split_elements(v).into_iter().map(str::to_owned))
            .collect()
    }

    /// Sets header `name` to `value`: replaces the first, drops the others,
    /// or appends.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.headers.iter().position(|(n, _)| same_name(n, name)) {
            Some(i) => {
                self.headers[i].1 = value.to_owned();
                let mut j = i + 1;
                while j < self.headers.len() {
                    if same_name(&self.headers[j].0, name) {
                        self.headers.remove(j);
                    } else {
                        j += 1;
                    }
                }
            }
            None => self.headers.push((name.to_owned(), value.to_owned())),
        }
    }

    /// Removes every field of header `name`.
    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !same_name(n, name));
    }

    /// Puts `value` as the first element of header `name` (as a proxy adds
    /// its Via or Record-Route).
    pub fn push_front(&mut self, name: &str, value: &str) {
        let at = self
            .headers
            .iter()
            .position(|(n, _)| same_name(n, name))
            .unwrap_or(0);
        self.headers.insert(at, (name.to_owned(), value.to_owned()));
    }

    /// Removes and returns the first element of header `name` (fields of it
    /// with no element before that one are removed too).
    pub fn pop_front(&mut self, name: &str) -> Option<String> {
        let i = loop {
            let i = self.headers.iter().position(|(n, _)| same_name(n, name))?;
            if split_elements(&self.headers[i].1).is_empty() {
                self.headers.remove(i);
            } else {
                break i;
            }
        };
        let elems: Vec<String> = split_elements(&self.headers[i].1)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut it = elems.into_iter();
        let first = it.next();
        let rest: Vec<String> = it.collect();
        if rest.is_empty() {
            self.headers.remove(i);
        } else {
            self.headers[i].1 = rest.join(", ");
        }
        first
    }

    /// `Call-ID`.
    pub fn call_id(&self) -> Option<&str> {
        self.header("Call-ID").filter(|v| !v.is_empty())
    }

    /// `CSeq` as (number, method).
    pub fn cseq(&self) -> Option<(u32, &str)> {
        let v = self.header("CSeq")?;
        let (n, m) = v.split_once(char::is_whitespace)?;
        Some((n.trim().parse().ok()?, m.trim()))
    }

    /// The top Via.
    pub fn top_via(&self) -> Option<Via> {
        Via::parse(self.elements("Via").first()?)
    }

    /// A response to this request with `code` and `reason`, copying Via, From,
    /// To (adding `to_tag` if it has none), Call-ID and CSeq (RFC 3261 §8.2.6).
    pub fn response(&self, code: u16, reason: &str, to_tag: &str) -> Message {
        let mut r = Message {
            start: StartLine::Response {
                code,
                reason: reason.to_owned(),
            },
            headers: Vec::new(),
            body: Vec::new(),
        };
        for (n, v) in &self.headers {
            if same_name(n, "Via")
                || same_name(n, "From")
                || same_name(n, "Call-ID")
                || same_name(n, "CSeq")
            {
                r.headers.push((long_name(n).to_owned(), v.clone()));
            } else if same_name(n, "To") {
                let v = if header_param(v, "tag").is_some() || code == 100 {
                    v.clone()
                } else {
                    format!("{v};tag={to_tag}")
                };
                r.headers.push(("To".into(), v));
            }
        }
        r
    }

    /// The message as bytes, with `Content-Length` set to the body's length.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::with_capacity(512 + self.body.len());
        match &self.start {
            StartLine::Request { method, uri } => {
                let _ = write!(s, "{method} {uri} SIP/2.0\r\n");
            }
            StartLine::Response { code, reason } => {
                let _ = write!(s, "SIP/2.0 {code} {reason}\r\n");
            }
        }
        for (n, v) in &self.headers {
            if same_name(n, "Content-Length") {
                continue;
            }
            let _ = write!(s, "{n}: {v}\r\n");
        }
        let _ = write!(s, "Content-Length: {}\r\n\r\n", self.body.len());
        let mut out = s.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// One Via element: `SIP/2.0/UDP host[:port];params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Transport (`UDP`).
    pub transport: String,
    /// Host of sent-by.
    pub host: String,
    /// Port of sent-by.
    pub port: Option<u16>,
    /// Parameters in order (`branch`, `rport`, `received`, …).
    pub params: Vec<(String, Option<String>)>,
}

impl Via {
    /// Parses one Via element.
    pub fn parse(s: &str) -> Option<Via> {
        let mut parts = s.split(';');
        let proto = parts.next()?.trim();
        let (proto, sent_by) = proto.split_once(char::is_whitespace)?;
        let transport = proto.trim().strip_prefix("SIP/2.0/")?.to_owned();
        let sent_by = sent_by.trim();
        let (host, port) = split_host_port(sent_by)?;
        let params = parts
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.trim().to_owned(), Some(v.trim().to_owned())),
                None => (p.trim().to_owned(), None),
            })
            .collect();
        Some(Via {
            transport,
            host,
            port,
            params,
        })
    }

    /// A parameter's value (`Some(None)`: present without a value).
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    /// Sets (or adds) a parameter.
    pub fn set_param(&mut self, name: &str, value: Option<String>) {
        match self
            .params
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(p) => p.1 = value,
            None => self.params.push((name.to_owned(), value)),
        }
    }

    /// Where a response to this hop goes: `received`/`rport` if set (RFC
    /// 3581), else sent-by (port 5060 by default).
    pub fn response_target(&self) -> Option<SocketAddr> {
        let host = self
            .param("received")
            .flatten()
            .unwrap_or(self.host.as_str());
        let ip: IpAddr = host.trim_matches(['[', ']']).parse().ok()?;
        let port = self
            .param("rport")
            .flatten()
            .and_then(|p| p.parse().ok())
            .or(self.port)
            .unwrap_or(5060);
        Some(SocketAddr::new(ip, port))
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        for (k, v) in &self.params {
            match v {
                Some(v) => write!(f, ";{k}={v}")?,
                None => write!(f, ";{k}")?,
            }
        }
        Ok(())
    }
}

fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((format!("[{host}]"), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), Some(p.parse().ok()?))),
        None => Some((s.to_owned(), None)),
    }
}

/// The `user` and `host[:port]` of a SIP URI (`sip:user@host:port;params`,
/// possibly inside `<…>` with a display name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// User part (may be empty).
    pub user: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: Option<u16>,
}

impl Uri {
    /// Parses the URI in a header value or a Request-URI.
    pub fn parse(s: &str) -> Option<Uri> {
        let s = match (s.find('<'), s.find('>')) {
            (Some(a), Some(b)) if a < b => &s[a + 1..b],
            _ => s.split(';').next()?,
        };
        let rest = s
            .trim()
            .strip_prefix("sip:")
            .or_else(|| s.trim().strip_prefix("sips:"))?;
        let rest = rest.split([';', '?']).next()?;
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (u.to_owned(), h),
            None => (String::new(), rest),
        };
        let (host, port) = split_host_port(hostport)?;
        if host.is_empty() {
            return None;
        }
        Some(Uri { user, host, port })
    }

    /// The address the URI names if its host is an IP address.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.trim_matches(['[', ']']).parse().ok()?;
        Some(SocketAddr::new(ip, self.port.unwrap_or(5060)))
    }
}

/// A header parameter's value (`tag` of From/To, `lr` of a Route…).
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let after = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value,
    };
    after.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}
