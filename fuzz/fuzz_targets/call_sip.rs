//! SIP messages (`qkdnet_call::sip`), one UDP datagram from anyone who can
//! reach the edge's port: any bytes give an error or a message, never a panic.
//! A message that parses re-encodes to bytes that parse to the same message
//! (up to `Content-Length`, which the encoder writes last, from the body), and
//! encoding that is a fixed point. The only re-parse failures allowed are the
//! bounds: the encoded form may outgrow `MAX_MESSAGE` (CRLF for LF, `": "` for
//! `":"`) or, with the `Content-Length` it adds, `MAX_HEADERS`. The header
//! helpers the edge calls on a parsed request never panic either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_call::sip::{self, MAX_HEADERS, MAX_MESSAGE, Message, SipError, Uri, header_param};

fn is_content_length(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l")
}

fn without_content_length(m: &Message) -> Vec<(String, String)> {
    m.headers
        .iter()
        .filter(|(n, _)| !is_content_length(n))
        .cloned()
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = sip::parse(data) else {
        return;
    };
    assert!(msg.headers.len() <= MAX_HEADERS);
    assert!(msg.body.len() <= data.len());

    // What the edge does with a request: read, then rewrite the top Via.
    let _ = (msg.method(), msg.code(), msg.call_id(), msg.cseq());
    let _ = msg.elements("Route");
    if let Some(to) = msg.header("To") {
        let _ = header_param(to, "tag");
        let _ = Uri::parse(to).and_then(|u| u.socket_addr());
    }
    let mut edited = msg.clone();
    if let Some(mut via) = edited.top_via() {
        let _ = via.response_target();
        via.set_param("received", Some("192.0.2.1".into()));
        via.set_param("rport", Some("5060".into()));
        assert!(edited.pop_front("Via").is_some());
        edited.push_front("Via", &via.to_string());
        assert_eq!(edited.top_via().as_ref(), Some(&via));
    }
    let _ = msg.response(200, "OK", "fuzz").encode();

    let bytes = msg.encode();
    let again = match sip::parse(&bytes) {
        Ok(m) => m,
        Err(SipError::TooLarge(n)) => {
            assert!(n > MAX_MESSAGE && bytes.len() == n);
            return;
        }
        Err(SipError::Header(_))
            if msg.headers.len() == MAX_HEADERS
                && !msg.headers.iter().any(|(n, _)| is_content_length(n)) =>
        {
            return;
        }
        Err(e) => panic!("re-encoded message does not parse: {e}"),
    };
    assert_eq!(again.start, msg.start);
    assert_eq!(again.body, msg.body);
    assert_eq!(without_content_length(&again), without_content_length(&msg));
    assert_eq!(
        again.header("Content-Length"),
        Some(&*msg.body.len().to_string())
    );
    assert_eq!(again.encode(), bytes);
});
