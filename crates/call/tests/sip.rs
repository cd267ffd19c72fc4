//! SIP parse/encode and header helpers (`qkdnet_call::sip`): a real baresip
//! INVITE, the RFC 3261 forms the edge must understand (compact names,
//! folding, several Via elements in one field), responses, and hostile input
//! that must be refused without a panic.

use std::net::SocketAddr;

use proptest::prelude::*;
use qkdnet_call::sip::{
    self, MAX_HEADERS, MAX_MESSAGE, Message, SipError, StartLine, Uri, Via, header_param,
    split_elements,
};

mod common;
use common::BARESIP_SDP as SDP;

const HEAD: &str = "INVITE sip:bob@127.0.0.1:15070 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:15060;branch=z9hG4bK7a6047e67434938d;rport\r\n\
Contact: <sip:alice-0x556ae7198b50@127.0.0.1:15060>\r\n\
Max-Forwards: 70\r\n\
To: <sip:bob@127.0.0.1:15070>\r\n\
From: <sip:alice@127.0.0.1:15060>;tag=ffa60ee423f2c78e\r\n\
Call-ID: f3b307823c72dbc9\r\n\
CSeq: 10495 INVITE\r\n\
User-Agent: baresip v1.0.0 (x86_64/linux)\r\n\
Allow: INVITE,ACK,BYE,CANCEL,OPTIONS,NOTIFY,SUBSCRIBE,INFO,MESSAGE,REFER\r\n\
Supported: gruu\r\n\
Content-Type: application/sdp\r\n";

/// The baresip INVITE as it came on the wire.
fn invite_bytes() -> Vec<u8> {
    format!("{HEAD}Content-Length: {}\r\n\r\n{SDP}", SDP.len()).into_bytes()
}

fn invite() -> Message {
    sip::parse(&invite_bytes()).expect("the baresip INVITE parses")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn baresip_invite_parses() {
    let m = invite();
    assert_eq!(
        m.start,
        StartLine::Request {
            method: "INVITE".into(),
            uri: "sip:bob@127.0.0.1:15070".into(),
        }
    );
    assert_eq!(m.method(), Some("INVITE"));
    assert_eq!(m.code(), None);
    let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Via",
            "Contact",
            "Max-Forwards",
            "To",
            "From",
            "Call-ID",
            "CSeq",
            "User-Agent",
            "Allow",
            "Supported",
            "Content-Type",
            "Content-Length",
        ]
    );
    assert_eq!(m.header("Max-Forwards"), Some("70"));
    assert_eq!(
        m.header("User-Agent"),
        Some("baresip v1.0.0 (x86_64/linux)")
    );
    assert_eq!(m.header("content-type"), Some("application/sdp"));
    assert_eq!(m.header("CONTENT-LENGTH"), Some(&*SDP.len().to_string()));
    assert_eq!(m.header("Route"), None);
    assert_eq!(m.call_id(), Some("f3b307823c72dbc9"));
    assert_eq!(m.cseq(), Some((10495, "INVITE")));
    assert_eq!(m.body, SDP.as_bytes());
    assert_eq!(
        m.elements("Allow"),
        [
            "INVITE",
            "ACK",
            "BYE",
            "CANCEL",
            "OPTIONS",
            "NOTIFY",
            "SUBSCRIBE",
            "INFO",
            "MESSAGE",
            "REFER"
        ]
    );
    assert_eq!(
        header_param(m.header("From").unwrap(), "tag"),
        Some("ffa60ee423f2c78e")
    );
    assert_eq!(header_param(m.header("To").unwrap(), "tag"), None);
}

#[test]
fn baresip_top_via() {
    let m = invite();
    let via = m.top_via().expect("top Via");
    assert_eq!(via.transport, "UDP");
    assert_eq!(via.host, "127.0.0.1");
    assert_eq!(via.port, Some(15060));
    assert_eq!(via.param("branch"), Some(Some("z9hG4bK7a6047e67434938d")));
    assert_eq!(via.param("BRANCH"), Some(Some("z9hG4bK7a6047e67434938d")));
    assert_eq!(via.param("rport"), Some(None), "rport present, no value");
    assert_eq!(via.param("received"), None);
    assert_eq!(via.response_target(), Some(addr("127.0.0.1:15060")));
    assert_eq!(
        via.to_string(),
        "SIP/2.0/UDP 127.0.0.1:15060;branch=z9hG4bK7a6047e67434938d;rport"
    );
}

#[test]
fn via_received_and_rport_steer_the_response() {
    let mut via = invite().top_via().unwrap();
    via.set_param("received", Some("192.0.2.7".into()));
    via.set_param("rport", Some("40000".into()));
    assert_eq!(via.response_target(), Some(addr("192.0.2.7:40000")));
    // set_param replaces in place, keeping the order.
    assert_eq!(
        via.to_string(),
        "SIP/2.0/UDP 127.0.0.1:15060;branch=z9hG4bK7a6047e67434938d;rport=40000;received=192.0.2.7"
    );
    assert_eq!(Via::parse(&via.to_string()), Some(via));

    let bare = Via::parse("SIP/2.0/UDP 198.51.100.1").unwrap();
    assert_eq!(bare.port, None);
    assert_eq!(bare.response_target(), Some(addr("198.51.100.1:5060")));

    let v6 = Via::parse("SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bKx").unwrap();
    assert_eq!(v6.host, "[2001:db8::1]");
    assert_eq!(v6.port, Some(5070));
    assert_eq!(v6.response_target(), Some(addr("[2001:db8::1]:5070")));
    assert_eq!(
        v6.to_string(),
        "SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bKx"
    );

    // A host name has no address to answer to.
    let named = Via::parse("SIP/2.0/TCP pc33.example.com:5060").unwrap();
    assert_eq!(named.transport, "TCP");
    assert_eq!(named.response_target(), None);

    for bad in [
        "",
        "SIP/2.0/UDP",
        "SIP/1.0/UDP 127.0.0.1",
        "127.0.0.1:5060",
        "SIP/2.0/UDP 127.0.0.1:notaport",
        "SIP/2.0/UDP 127.0.0.1:70000",
        "SIP/2.0/UDP [::1",
        // Anything after the bracket but a port is refused, not dropped.
        "SIP/2.0/UDP [::1]x",
        "SIP/2.0/UDP [::1]\";x=,\"",
    ] {
        assert_eq!(Via::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn uri_parsing() {
    let m = invite();
    let contact = Uri::parse(m.header("Contact").unwrap()).unwrap();
    assert_eq!(contact.user, "alice-0x556ae7198b50");
    assert_eq!(contact.host, "127.0.0.1");
    assert_eq!(contact.port, Some(15060));
    assert_eq!(contact.socket_addr(), Some(addr("127.0.0.1:15060")));

    let from = Uri::parse(m.header("From").unwrap()).unwrap();
    assert_eq!(
        from,
        Uri {
            user: "alice".into(),
            host: "127.0.0.1".into(),
            port: Some(15060),
        }
    );
    let StartLine::Request { uri, .. } = &m.start else {
        panic!("a request");
    };
    let ruri = Uri::parse(uri).unwrap();
    assert_eq!(ruri.user, "bob");
    assert_eq!(ruri.socket_addr(), Some(addr("127.0.0.1:15070")));

    let named = Uri::parse("\"Bob, B.\" <sips:bob@biloxi.example.com;transport=tcp>").unwrap();
    assert_eq!(named.user, "bob");
    assert_eq!(named.host, "biloxi.example.com");
    assert_eq!(named.port, None);
    assert_eq!(named.socket_addr(), None);

    let no_user = Uri::parse("sip:192.0.2.1;lr").unwrap();
    assert_eq!(no_user.user, "");
    assert_eq!(no_user.socket_addr(), Some(addr("192.0.2.1:5060")));

    let headers = Uri::parse("sip:carol@192.0.2.2:5062?subject=x").unwrap();
    assert_eq!(headers.socket_addr(), Some(addr("192.0.2.2:5062")));

    let v6 = Uri::parse("<sip:dave@[2001:db8::2]:5080>;tag=1").unwrap();
    assert_eq!(v6.host, "[2001:db8::2]");
    assert_eq!(v6.socket_addr(), Some(addr("[2001:db8::2]:5080")));

    for bad in [
        "",
        "tel:+15551234",
        "<>",
        "sip:",
        "sip:bob@",
        "sip:bob@host:port",
        "<sip:bob@[::1>",
        "<sip:bob@[::1]junk>",
    ] {
        assert_eq!(Uri::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn header_params() {
    assert_eq!(header_param("<sip:a@b;x=1>;tag=9", "tag"), Some("9"));
    // Parameters inside the <…> belong to the URI, not the header.
    assert_eq!(header_param("<sip:a@b;tag=1>", "tag"), None);
    assert_eq!(header_param("sip:a@b;tag=7", "tag"), Some("7"));
    assert_eq!(header_param("<sip:p@x>;lr", "lr"), Some(""));
    assert_eq!(header_param("<sip:a@b>; TAG = 5 ", "tag"), Some("5"));
}

#[test]
fn split_elements_respects_brackets_and_quotes() {
    assert_eq!(
        split_elements("\"Doe, J\" <sip:a@b;x=1,2>, <sip:c@d> ,, sip:e@f"),
        ["\"Doe, J\" <sip:a@b;x=1,2>", "<sip:c@d>", "sip:e@f"]
    );
    assert!(split_elements("").is_empty());
    assert!(split_elements(" , ,").is_empty());
    // Unbalanced brackets do not panic; a stray '>' does not hide commas.
    assert_eq!(split_elements(">a,b<c,d"), [">a", "b<c", "d"]);
    assert_eq!(split_elements("<a,b"), ["<a,b"]);
    assert_eq!(split_elements("\"a,b"), ["\"a,b"]);
}

#[test]
fn encode_parse_round_trip() {
    let m = invite();
    let bytes = m.encode();
    assert_eq!(
        bytes,
        invite_bytes(),
        "the baresip INVITE re-encodes as it came"
    );
    assert_eq!(sip::parse(&bytes).unwrap(), m);

    // Content-Length follows the body, whatever the header said.
    let mut changed = m.clone();
    changed.body = b"v=0\r\n".to_vec();
    changed.set("Content-Length", "9999");
    let again = sip::parse(&changed.encode()).unwrap();
    assert_eq!(again.body, b"v=0\r\n");
    assert_eq!(again.header("Content-Length"), Some("5"));
    assert_eq!(
        again
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .count(),
        1
    );

    // A response round-trips too.
    let r = m.response(180, "Ringing", "t1");
    let bytes = r.encode();
    assert!(bytes.starts_with(b"SIP/2.0 180 Ringing\r\n"));
    let back = sip::parse(&bytes).unwrap();
    assert_eq!(back.code(), Some(180));
    assert_eq!(
        back.method(),
        Some("INVITE"),
        "a response's method is its CSeq's"
    );
    assert_eq!(&back.headers[..r.headers.len()], &r.headers[..]);
    assert_eq!(back.header("Content-Length"), Some("0"));
    assert!(back.body.is_empty());
}

#[test]
fn compact_header_names() {
    let raw = "BYE sip:bob@127.0.0.1:15070 SIP/2.0\r\n\
v: SIP/2.0/UDP 127.0.0.1:15060;branch=z9hG4bKc1\r\n\
f: <sip:alice@127.0.0.1>;tag=a\r\n\
t: <sip:bob@127.0.0.1>;tag=b\r\n\
i: compact-call\r\n\
m: <sip:alice@127.0.0.1:15060>\r\n\
k: timer\r\n\
s: hello\r\n\
c: text/plain\r\n\
CSeq: 2 BYE\r\n\
l: 4\r\n\
\r\n\
ABCDEFGH";
    let m = sip::parse(raw.as_bytes()).unwrap();
    assert_eq!(m.body, b"ABCD", "body cut at the compact Content-Length");
    assert_eq!(m.call_id(), Some("compact-call"));
    assert_eq!(m.header("Call-ID"), Some("compact-call"));
    assert_eq!(m.header("i"), Some("compact-call"));
    assert_eq!(m.header("From"), Some("<sip:alice@127.0.0.1>;tag=a"));
    assert_eq!(m.header("To"), Some("<sip:bob@127.0.0.1>;tag=b"));
    assert_eq!(m.header("Contact"), Some("<sip:alice@127.0.0.1:15060>"));
    assert_eq!(m.header("Supported"), Some("timer"));
    assert_eq!(m.header("Subject"), Some("hello"));
    assert_eq!(m.header("Content-Type"), Some("text/plain"));
    assert_eq!(m.header("content-length"), Some("4"));
    assert_eq!(
        m.top_via().unwrap().param("branch"),
        Some(Some("z9hG4bKc1"))
    );
    // Names are kept as they came.
    assert_eq!(m.headers[0].0, "v");

    // A response built from compact headers uses the long names.
    let r = m.response(200, "OK", "x");
    let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Via", "From", "To", "Call-ID", "CSeq"]);

    // set/remove see through the compact form.
    let mut m2 = m.clone();
    m2.set("Call-ID", "new");
    assert_eq!(m2.header("i"), Some("new"));
    assert_eq!(m2.headers.iter().filter(|(n, _)| n == "i").count(), 1);
    m2.remove("Via");
    assert_eq!(m2.top_via(), None);

    // Encoding drops the compact Content-Length in favour of one long one.
    let bytes = m.encode();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(!text.contains("\r\nl: "));
    assert!(text.ends_with("Content-Length: 4\r\n\r\nABCD"));
    let back = sip::parse(&bytes).unwrap();
    assert_eq!(back.body, m.body);
    assert_eq!(back.call_id(), m.call_id());
}

#[test]
fn folded_header_lines() {
    let raw = "OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060\r\n\
\x20;branch=z9hG4bKfold\r\n\
Subject: I know you're there,\r\n\
\tpick up the phone\r\n\
\x20  and talk to me!\r\n\
Call-ID: fold\r\n\
CSeq: 1 OPTIONS\r\n\
\r\n";
    let m = sip::parse(raw.as_bytes()).unwrap();
    assert_eq!(m.headers.len(), 4);
    assert_eq!(
        m.header("Subject"),
        Some("I know you're there, pick up the phone and talk to me!")
    );
    let via = m.top_via().unwrap();
    assert_eq!(via.port, Some(5060));
    assert_eq!(via.param("branch"), Some(Some("z9hG4bKfold")));
    assert!(m.body.is_empty());
    // Encoded unfolded; parses to the same fields.
    let back = sip::parse(&m.encode()).unwrap();
    assert_eq!(&back.headers[..4], &m.headers[..]);

    // A continuation with nothing before it is an error.
    let orphan = "OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n continued: x\r\n\r\n";
    assert!(matches!(
        sip::parse(orphan.as_bytes()),
        Err(SipError::Header(_))
    ));
}

#[test]
fn blank_continuations_leave_no_stray_space() {
    // A folded value whose continuation is blank, or whose first line is
    // empty, parses to the same value after encode and parse again.
    let raw = "OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\nX-A: one\r\n  \r\nX-B:\r\n two\r\n\r\n";
    let m = sip::parse(raw.as_bytes()).unwrap();
    assert_eq!(m.header("X-A"), Some("one"));
    assert_eq!(m.header("X-B"), Some("two"));
    let back = sip::parse(&m.encode()).unwrap();
    assert_eq!(&back.headers[..2], &m.headers[..]);
}

#[test]
fn lf_only_message() {
    let raw = "SIP/2.0 200 OK\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKlf\nCSeq: 7 REGISTER\nCall-ID: lf\nContent-Length: 3\n\nabc";
    let m = sip::parse(raw.as_bytes()).unwrap();
    assert_eq!(
        m.start,
        StartLine::Response {
            code: 200,
            reason: "OK".into()
        }
    );
    assert_eq!(m.method(), Some("REGISTER"));
    assert_eq!(m.cseq(), Some((7, "REGISTER")));
    assert_eq!(m.body, b"abc");
}

#[test]
fn body_is_cut_at_the_first_blank_line() {
    // An LF-only message whose body happens to hold a CRLF blank line: the
    // headers end at the first blank line, the rest is body, and nothing of
    // the body becomes a header.
    let raw = b"MESSAGE sip:bob@127.0.0.1 SIP/2.0\nCall-ID: smuggle\nCSeq: 1 MESSAGE\n\nVia: SIP/2.0/UDP 6.6.6.6:5060\r\n\r\n";
    let m = sip::parse(raw).unwrap();
    assert_eq!(m.headers.len(), 2);
    assert_eq!(m.header("Via"), None);
    assert_eq!(m.body, b"Via: SIP/2.0/UDP 6.6.6.6:5060\r\n\r\n");
}

#[test]
fn start_lines() {
    let ok = |s: &str| sip::parse(format!("{s}\r\n\r\n").as_bytes());
    assert_eq!(
        ok("SIP/2.0 100 Trying").unwrap().start,
        StartLine::Response {
            code: 100,
            reason: "Trying".into()
        }
    );
    assert_eq!(
        ok("SIP/2.0 486 Busy Here").unwrap().start,
        StartLine::Response {
            code: 486,
            reason: "Busy Here".into()
        }
    );
    assert_eq!(
        ok("SIP/2.0 699").unwrap().start,
        StartLine::Response {
            code: 699,
            reason: String::new()
        }
    );
    assert_eq!(
        ok("ACK sip:bob@127.0.0.1 SIP/2.0").unwrap().method(),
        Some("ACK")
    );
    for bad in [
        "",
        "INVITE",
        "INVITE sip:bob@127.0.0.1",
        "INVITE sip:bob@127.0.0.1 SIP/3.0",
        "INVITE sip:bob@127.0.0.1 SIP/2.0 extra",
        "INVITE  sip:bob@127.0.0.1 SIP/2.0",
        "invite sip:bob@127.0.0.1 SIP/2.0",
        "IN-VITE sip:bob@127.0.0.1 SIP/2.0",
        " INVITE sip:bob@127.0.0.1 SIP/2.0",
        "SIP/2.0 99 Low",
        "SIP/2.0 700 High",
        "SIP/2.0 abc OK",
        "SIP/2.0 65536 Overflow",
        "SIP/2.0",
        "HTTP/1.1 200 OK",
    ] {
        match ok(bad) {
            Err(SipError::StartLine(_)) => {}
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
}

#[test]
fn multiple_via_elements_pop_and_push() {
    let raw = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;received=192.0.2.1, SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKb\r\n\
Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bKc\r\n\
CSeq: 1 INVITE\r\n\
Call-ID: vias\r\n\
Content-Length: 0\r\n\
\r\n";
    let mut m = sip::parse(raw.as_bytes()).unwrap();
    let vias = m.elements("Via");
    assert_eq!(vias.len(), 3);
    assert_eq!(
        vias[1], "SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKb",
        "split at the comma, trimmed"
    );
    let top = m.top_via().unwrap();
    assert_eq!(top.host, "10.0.0.1");
    assert_eq!(top.response_target(), Some(addr("192.0.2.1:5060")));

    // Popping the top element keeps the rest of that field.
    let first = m.pop_front("Via").unwrap();
    assert_eq!(
        first,
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;received=192.0.2.1"
    );
    assert_eq!(m.headers.len(), 5);
    assert_eq!(
        m.headers[0],
        (
            "Via".to_owned(),
            "SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKb".to_owned()
        )
    );
    assert_eq!(m.top_via().unwrap().port, Some(5062));

    // Popping the last element of a field removes the field.
    let second = m.pop_front("Via").unwrap();
    assert!(second.ends_with("branch=z9hG4bKb"));
    assert_eq!(m.headers.len(), 4);
    assert_eq!(m.top_via().unwrap().host, "10.0.0.3");

    // push_front goes before the first Via, not at the top of the message.
    m.push_front("Via", "SIP/2.0/UDP 127.0.0.9:5099;branch=z9hG4bKedge");
    assert_eq!(m.headers[0].0, "Via");
    assert_eq!(m.top_via().unwrap().port, Some(5099));
    assert_eq!(m.elements("Via").len(), 2);
    m.push_front("Record-Route", "<sip:127.0.0.9:5099;lr>");
    assert_eq!(m.headers[0].0, "Record-Route", "no field yet: at the top");

    assert!(m.pop_front("Via").is_some());
    assert!(m.pop_front("Via").is_some());
    assert_eq!(m.pop_front("Via"), None);
    assert_eq!(m.top_via(), None);
    assert_eq!(m.header("Call-ID"), Some("vias"));

    // After all that the message still round-trips.
    assert_eq!(sip::parse(&m.encode()).unwrap(), m);
}

#[test]
fn pop_front_skips_empty_fields() {
    // top_via sees through an empty Via field; pop_front takes that same
    // element, so the edge's pop-then-push replaces the top Via rather than
    // leaving it behind a rewritten copy.
    let raw = "INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia:\r\nVia: , \r\nCall-ID: e\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKtop, SIP/2.0/UDP 10.0.0.2\r\n\r\n";
    let mut m = sip::parse(raw.as_bytes()).unwrap();
    let mut via = m.top_via().unwrap();
    assert_eq!(via.host, "10.0.0.1");
    assert_eq!(
        m.pop_front("Via").as_deref(),
        Some("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKtop")
    );
    via.set_param("received", Some("192.0.2.9".into()));
    m.push_front("Via", &via.to_string());
    assert_eq!(m.top_via(), Some(via));
    assert_eq!(m.elements("Via").len(), 2);
    assert_eq!(
        m.headers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["Call-ID", "Via", "Via"]
    );
    // Only empty fields left: nothing to pop, and they are gone.
    let mut m = sip::parse(b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: ,\r\nVia:\r\n\r\n").unwrap();
    assert_eq!(m.pop_front("Via"), None);
    assert!(m.headers.is_empty());
}

#[test]
fn set_replaces_first_drops_rest_or_appends() {
    let mut m = Message::request("INFO", "sip:x@127.0.0.1");
    m.headers.push(("Route".into(), "<sip:a>".into()));
    m.headers.push(("Max-Forwards".into(), "70".into()));
    m.headers.push(("route".into(), "<sip:b>".into()));
    m.set("Route", "<sip:c>");
    assert_eq!(
        m.headers,
        [
            ("Route".to_owned(), "<sip:c>".to_owned()),
            ("Max-Forwards".to_owned(), "70".to_owned()),
        ]
    );
    m.set("Max-Forwards", "69");
    assert_eq!(m.header("max-forwards"), Some("69"));
    m.set("X-QKD-Session", "abc");
    assert_eq!(m.headers.last().unwrap().0, "X-QKD-Session");
    m.remove("route");
    assert_eq!(m.header("Route"), None);
    assert_eq!(m.headers.len(), 2);
}

#[test]
fn response_copies_dialog_headers_and_tags_to() {
    let req = invite();
    let r = req.response(180, "Ringing", "edge-tag");
    assert_eq!(
        r.start,
        StartLine::Response {
            code: 180,
            reason: "Ringing".into()
        }
    );
    assert_eq!(r.code(), Some(180));
    assert!(r.body.is_empty());
    let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["Via", "To", "From", "Call-ID", "CSeq"],
        "request order"
    );
    assert_eq!(r.header("Via"), req.header("Via"));
    assert_eq!(r.header("From"), req.header("From"));
    assert_eq!(r.call_id(), req.call_id());
    assert_eq!(r.cseq(), Some((10495, "INVITE")));
    assert_eq!(
        r.header("To"),
        Some("<sip:bob@127.0.0.1:15070>;tag=edge-tag")
    );
    assert_eq!(
        header_param(r.header("To").unwrap(), "tag"),
        Some("edge-tag")
    );
    assert_eq!(r.header("Contact"), None);
    assert_eq!(r.header("User-Agent"), None);

    // 100 Trying gets no To tag (RFC 3261 §8.2.6.2).
    let trying = req.response(100, "Trying", "edge-tag");
    assert_eq!(trying.header("To"), Some("<sip:bob@127.0.0.1:15070>"));

    // A To that already has a tag keeps it, however the parameter is written.
    for to in [
        "<sip:bob@127.0.0.1>;tag=abc",
        "<sip:bob@127.0.0.1>;TAG=abc",
        "<sip:bob@127.0.0.1> ; tag=abc",
    ] {
        let mut in_dialog = req.clone();
        in_dialog.set("To", to);
        let r = in_dialog.response(200, "OK", "edge-tag");
        assert_eq!(r.header("To"), Some(to), "{to}");
    }

    // Every Via field, in order.
    let mut two = req.clone();
    two.push_front("Via", "SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKp");
    let r = two.response(200, "OK", "t");
    assert_eq!(r.elements("Via"), two.elements("Via"));
    assert_eq!(r.top_via().unwrap().host, "10.9.9.9");
}

fn message_with(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!("INVITE sip:bob@127.0.0.1 SIP/2.0\r\n{headers}\r\n").into_bytes();
    v.extend_from_slice(body);
    v
}

#[test]
fn bad_messages_are_errors() {
    // Body shorter than Content-Length.
    let mut truncated = invite_bytes();
    truncated.truncate(truncated.len() - 10);
    assert_eq!(
        sip::parse(&truncated),
        Err(SipError::Truncated {
            got: SDP.len() - 10,
            want: SDP.len(),
        })
    );
    // Extra bytes after the announced body are not part of it.
    let mut extra = invite_bytes();
    extra.extend_from_slice(b"garbage");
    assert_eq!(sip::parse(&extra).unwrap().body, SDP.as_bytes());

    for cl in ["abc", "-1", "1.5", "", "99999999999999999999999999", "0x10"] {
        let m = message_with(&format!("Call-ID: x\r\nContent-Length: {cl}\r\n"), b"");
        assert_eq!(
            sip::parse(&m),
            Err(SipError::Missing("Content-Length")),
            "{cl:?}"
        );
    }
    // Content-Length larger than the datagram.
    let m = message_with("Content-Length: 1000000\r\n", b"short");
    assert!(matches!(
        sip::parse(&m),
        Err(SipError::Truncated {
            got: 5,
            want: 1000000
        })
    ));

    // Too large.
    let mut big = message_with("Call-ID: big\r\n", b"");
    big.resize(MAX_MESSAGE + 1, b'x');
    assert_eq!(sip::parse(&big), Err(SipError::TooLarge(MAX_MESSAGE + 1)));
    // Exactly MAX_MESSAGE is fine.
    big.truncate(MAX_MESSAGE);
    assert_eq!(sip::parse(&big).unwrap().body.len(), MAX_MESSAGE - 50);

    // No blank line after the headers.
    assert!(matches!(
        sip::parse(b"INVITE sip:bob@127.0.0.1 SIP/2.0\r\nCall-ID: x\r\n"),
        Err(SipError::Header(_))
    ));
    assert!(matches!(sip::parse(b""), Err(SipError::Header(_))));

    // Bad start line.
    assert!(matches!(
        sip::parse(b"HELLO WORLD\r\n\r\n"),
        Err(SipError::StartLine(_))
    ));
    assert!(matches!(
        sip::parse(b"\r\n\r\n"),
        Err(SipError::StartLine(_))
    ));

    // Header without a colon, empty or bad name.
    for h in [
        "NoColonHere",
        ": empty-name",
        "Bad Name: x",
        "Bad\u{7f}: x",
        "Caf\u{e9}: x",
    ] {
        let m = message_with(&format!("{h}\r\n"), b"");
        assert!(matches!(sip::parse(&m), Err(SipError::Header(_))), "{h:?}");
    }

    // More than MAX_HEADERS; exactly MAX_HEADERS is fine.
    let many = |n: usize| {
        let h: String = (0..n).map(|i| format!("X-H{i}: {i}\r\n")).collect();
        message_with(&h, b"")
    };
    assert_eq!(
        sip::parse(&many(MAX_HEADERS)).unwrap().headers.len(),
        MAX_HEADERS
    );
    assert!(matches!(
        sip::parse(&many(MAX_HEADERS + 1)),
        Err(SipError::Header(_))
    ));
    // Folded lines do not count as headers.
    let folded = {
        let mut h: String = (0..MAX_HEADERS)
            .map(|i| format!("X-H{i}: {i}\r\n"))
            .collect();
        h.push_str(" more\r\n\tand more\r\n");
        message_with(&h, b"")
    };
    assert_eq!(sip::parse(&folded).unwrap().headers.len(), MAX_HEADERS);

    // Non-UTF-8 in the headers; a binary body is fine.
    let m = message_with("Subject: \u{0}caf\r\n", b"");
    assert!(sip::parse(&m).is_ok(), "NUL is valid UTF-8");
    let mut m = message_with("Subject: xx\r\n", b"");
    let at = m.iter().position(|&b| b == b'x').unwrap();
    m[at] = 0xff;
    assert_eq!(sip::parse(&m), Err(SipError::NotText));
    let mut m = b"INVITE sip:b\xc3\x28@127.0.0.1 SIP/2.0\r\n\r\n".to_vec();
    assert_eq!(sip::parse(&m), Err(SipError::NotText));
    m = message_with("Content-Length: 4\r\n", &[0xff, 0x00, 0xfe, 0x80]);
    assert_eq!(sip::parse(&m).unwrap().body, [0xff, 0x00, 0xfe, 0x80]);
}

#[test]
fn helpers_on_missing_or_bad_headers() {
    let mut m = Message::request("OPTIONS", "sip:x@127.0.0.1");
    assert_eq!(m.call_id(), None);
    assert_eq!(m.cseq(), None);
    assert_eq!(m.top_via(), None);
    m.headers.push(("Call-ID".into(), String::new()));
    assert_eq!(m.call_id(), None, "an empty Call-ID is none");
    for bad in ["", "12", "x OPTIONS", "4294967296 OPTIONS", "-1 OPTIONS"] {
        m.set("CSeq", bad);
        assert_eq!(m.cseq(), None, "{bad:?}");
    }
    m.set("CSeq", "4294967295   OPTIONS");
    assert_eq!(m.cseq(), Some((u32::MAX, "OPTIONS")));
    m.set("Via", "garbage");
    assert_eq!(m.top_via(), None);
    let resp = Message {
        start: StartLine::Response {
            code: 200,
            reason: "OK".into(),
        },
        headers: vec![],
        body: vec![],
    };
    assert_eq!(resp.method(), None, "a response without CSeq has no method");
}

// ---------------------------------------------------------------- proptests

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._~!%*+`'-]{0,15}"
}

/// A header value: printable ASCII (no CR/LF), no leading/trailing space.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[!-~]([ !-~]{0,40}[!-~])?",
        "<sip:[a-z]{1,8}@127\\.0\\.0\\.1:[0-9]{4}>;tag=[0-9a-f]{8}",
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Via".to_owned()),
        Just("From".to_owned()),
        Just("To".to_owned()),
        Just("Call-ID".to_owned()),
        Just("CSeq".to_owned()),
        Just("v".to_owned()),
        Just("i".to_owned()),
        Just("X-QKD-Session".to_owned()),
        token(),
    ]
    .prop_filter("Content-Length is the encoder's", |n| {
        !matches!(n.to_ascii_lowercase().as_str(), "content-length" | "l")
    })
}

fn start_line() -> impl Strategy<Value = StartLine> {
    prop_oneof![
        (
            "[A-Z]{1,10}",
            "sips?:[a-z0-9]{0,8}@?[a-z0-9.]{1,15}(:[0-9]{1,5})?(;[a-z]{1,5}=[a-z0-9]{1,5})?"
        )
            .prop_map(|(method, uri)| StartLine::Request { method, uri }),
        (100u16..700, "([!-~]([ !-~]{0,20}[!-~])?)?")
            .prop_map(|(code, reason)| StartLine::Response { code, reason }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = sip::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_mutated_invite(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = invite_bytes();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let _ = sip::parse(&bytes);
        bytes.truncate(cut.index(bytes.len()));
        let _ = sip::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_sip_like_text(
        lines in proptest::collection::vec("[ \tA-Za-z0-9:;,<>@=./\"-]{0,30}", 0..20),
        crlf in any::<bool>(),
    ) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let text = format!("INVITE sip:a@b SIP/2.0{eol}{}{eol}{eol}", lines.join(eol));
        if let Ok(m) = sip::parse(text.as_bytes()) {
            // Whatever parsed re-encodes to something that parses the same.
            let again = sip::parse(&m.encode()).expect("re-encoded message parses");
            prop_assert_eq!(again.start, m.start);
            prop_assert_eq!(again.body, m.body);
        }
    }

    #[test]
    fn valid_messages_round_trip(
        start in start_line(),
        headers in proptest::collection::vec((header_name(), value()), 0..12),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let m = Message { start, headers, body };
        let bytes = m.encode();
        let back = sip::parse(&bytes).expect("an encoded message parses");
        let mut want = m.clone();
        want.headers.push(("Content-Length".into(), m.body.len().to_string()));
        prop_assert_eq!(&back, &want);
        // And encoding is then a fixed point.
        prop_assert_eq!(back.encode(), bytes);
    }
}
