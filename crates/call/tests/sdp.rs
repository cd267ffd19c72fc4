//! The audio stream of an SDP and its rewrite toward the relay
//! (`qkdnet_call::sdp`), on baresip's offer and on the forms RFC 8866 allows.

use std::net::SocketAddr;

use proptest::prelude::*;
use qkdnet_call::sdp::{self, Audio, SdpError};

mod common;
use common::BARESIP_SDP as BARESIP;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn lines(b: &[u8]) -> Vec<String> {
    std::str::from_utf8(b)
        .expect("rewritten SDP is text")
        .split("\r\n")
        .map(str::to_owned)
        .collect()
}

#[test]
fn baresip_audio() {
    assert_eq!(
        sdp::audio(BARESIP.as_bytes()),
        Ok(Audio {
            rtp: addr("127.0.0.1:20006"),
            proto: "RTP/SAVP".into(),
        })
    );
    // LF-only line ends are read the same.
    let lf = BARESIP.replace("\r\n", "\n");
    assert_eq!(
        sdp::audio(lf.as_bytes()).unwrap().rtp,
        addr("127.0.0.1:20006")
    );
}

#[test]
fn media_level_connection_overrides_session_level() {
    let body = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 0\r\nc=IN IP4 192.0.2.44/127\r\na=sendrecv\r\n";
    let a = sdp::audio(body.as_bytes()).unwrap();
    assert_eq!(a.rtp, addr("192.0.2.44:4000"), "media c= wins, TTL ignored");
    assert_eq!(a.proto, "RTP/AVP");

    // Media-level only, no session-level c=.
    let body = "v=0\r\ns=-\r\nt=0 0\r\nm=audio 4002 RTP/AVP 8\r\nc=IN IP6 2001:db8::5\r\n";
    assert_eq!(
        sdp::audio(body.as_bytes()).unwrap().rtp,
        addr("[2001:db8::5]:4002")
    );

    // A port count (m=audio 4004/2) gives the first port; no proto means RTP/AVP.
    let body = "v=0\r\nc=IN IP4 10.1.1.1\r\nm=audio 4004/2\r\n";
    assert_eq!(
        sdp::audio(body.as_bytes()),
        Ok(Audio {
            rtp: addr("10.1.1.1:4004"),
            proto: "RTP/AVP".into(),
        })
    );
}

#[test]
fn other_media_sections_do_not_lend_their_address() {
    // The video section's c= belongs to the video, not to the session: audio
    // that has no c= of its own uses the session-level one.
    let body = "v=0\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
m=video 5000 RTP/AVP 96\r\nc=IN IP4 203.0.113.9\r\n\
m=audio 6000 RTP/AVP 0\r\n";
    assert_eq!(
        sdp::audio(body.as_bytes()).unwrap().rtp,
        addr("198.51.100.1:6000")
    );
    // And with no session-level c= the audio has no address at all.
    let body = "v=0\r\nt=0 0\r\n\
m=video 5000 RTP/AVP 96\r\nc=IN IP4 203.0.113.9\r\n\
m=audio 6000 RTP/AVP 0\r\n";
    assert_eq!(sdp::audio(body.as_bytes()), Err(SdpError::NoAudio));
    // A c= in a section after the audio one does not change it either.
    let body = "v=0\r\nc=IN IP4 198.51.100.1\r\n\
m=audio 6000 RTP/AVP 0\r\n\
m=video 5000 RTP/AVP 96\r\nc=IN IP4 203.0.113.9\r\n";
    assert_eq!(
        sdp::audio(body.as_bytes()).unwrap().rtp,
        addr("198.51.100.1:6000")
    );
}

#[test]
fn no_audio() {
    for body in [
        "",
        "v=0\r\nc=IN IP4 127.0.0.1\r\nm=video 5000 RTP/AVP 96\r\n",
        // An audio line without a usable port.
        "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio\r\n",
        "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio x RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 70000 RTP/AVP 0\r\n",
        // No connection address anywhere, or one that is not an address.
        "v=0\r\nm=audio 4000 RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4 host.example\r\nm=audio 4000 RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4\r\nm=audio 4000 RTP/AVP 0\r\n",
        "m=audio 4000 RTP/AVP 0\r\nc=IN IP4 not-an-ip\r\n",
    ] {
        assert_eq!(
            sdp::audio(body.as_bytes()),
            Err(SdpError::NoAudio),
            "{body:?}"
        );
    }
    assert_eq!(sdp::audio(b"v=0\r\n\xff\xfe\r\n"), Err(SdpError::NotText));
    assert_eq!(
        sdp::rewrite(b"\xc3\x28", addr("127.0.0.1:1"), "RTP/AVP"),
        Err(SdpError::NotText)
    );
}

#[test]
fn two_audio_streams_unsupported() {
    let body = format!("{BARESIP}m=audio 20008 RTP/AVP 0\r\n");
    assert!(matches!(
        sdp::audio(body.as_bytes()),
        Err(SdpError::Unsupported(_))
    ));
    let body = "v=0\r\nc=IN IP4 10.0.0.1\r\nm=audio 1 RTP/AVP 0\r\nm=video 2 RTP/AVP 96\r\nm=audio 3 RTP/AVP 0\r\n";
    assert!(matches!(
        sdp::audio(body.as_bytes()),
        Err(SdpError::Unsupported(_))
    ));
}

#[test]
fn rewrite_points_at_the_relay() {
    let relay = addr("10.20.30.40:30000");
    let out = sdp::rewrite(BARESIP.as_bytes(), relay, "RTP/AVP").unwrap();
    let got = lines(&out);
    let want: Vec<String> = [
        "v=0",
        "o=- 1373204154 2010624654 IN IP4 10.20.30.40",
        "s=-",
        "c=IN IP4 10.20.30.40",
        "t=0 0",
        "a=tool:baresip 1.0.0",
        "m=audio 30000 RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
        "a=sendrecv",
        "a=label:1",
        "a=rtcp-rsize",
        "a=ssrc:2851979417 cname:sip:alice@127.0.0.1:15060",
        "a=minptime:20",
        "a=ptime:20",
        "",
    ]
    .map(str::to_owned)
    .to_vec();
    assert_eq!(got, want);
    let text = String::from_utf8(out.clone()).unwrap();
    assert!(
        !text.contains("a=crypto"),
        "no key material leaves the edge"
    );
    assert!(!text.contains("inline:"));
    assert_eq!(
        sdp::audio(&out),
        Ok(Audio {
            rtp: relay,
            proto: "RTP/AVP".into(),
        })
    );

    // The reverse: an RTP/AVP offer rewritten as SRTP for the far edge.
    let back = sdp::rewrite(&out, addr("127.0.0.1:20006"), "RTP/SAVP").unwrap();
    assert_eq!(sdp::audio(&back).unwrap().proto, "RTP/SAVP");
    assert_eq!(sdp::audio(&back).unwrap().rtp, addr("127.0.0.1:20006"));
}

#[test]
fn rewrite_drops_rtcp_and_crypto_keeps_the_rest_in_order() {
    let body = "v=0\n\
o=carol 28908764872 28908764872 IN IP4 100.3.6.6\n\
s=-\n\
t=0 0\n\
m=audio 49170 RTP/SAVPF 0 8 97\n\
c=IN IP4 100.3.6.6/64\n\
a=rtcp:49171 IN IP4 100.3.6.6\n\
a=rtcp-mux\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n\
a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB\n\
a=rtpmap:97 iLBC/8000\n\
a=x-unknown:keep me   \n";
    let out = sdp::rewrite(body.as_bytes(), addr("192.0.2.1:7000"), "RTP/AVP").unwrap();
    assert_eq!(
        lines(&out),
        [
            "v=0",
            "o=carol 28908764872 28908764872 IN IP4 192.0.2.1",
            "s=-",
            "t=0 0",
            "m=audio 7000 RTP/AVP 0 8 97",
            "c=IN IP4 192.0.2.1",
            "a=rtcp-mux",
            "a=rtpmap:97 iLBC/8000",
            "a=x-unknown:keep me",
            "",
        ]
    );
}

#[test]
fn rewrite_on_ipv6_relay() {
    let relay = addr("[2001:db8::7]:31000");
    let out = sdp::rewrite(BARESIP.as_bytes(), relay, "RTP/AVP").unwrap();
    let got = lines(&out);
    assert_eq!(got[1], "o=- 1373204154 2010624654 IN IP6 2001:db8::7");
    assert_eq!(got[3], "c=IN IP6 2001:db8::7");
    assert_eq!(got[6], "m=audio 31000 RTP/AVP 0 101");
    assert_eq!(
        got.len(),
        lines(BARESIP.as_bytes()).len() - 1,
        "a=crypto gone"
    );
    assert_eq!(
        sdp::audio(&out),
        Ok(Audio {
            rtp: relay,
            proto: "RTP/AVP".into(),
        })
    );
    // And from IPv6 back to IPv4.
    let v4 = sdp::rewrite(&out, addr("127.0.0.1:9"), "RTP/AVP").unwrap();
    assert_eq!(lines(&v4)[3], "c=IN IP4 127.0.0.1");
    assert_eq!(sdp::audio(&v4).unwrap().rtp, addr("127.0.0.1:9"));
}

#[test]
fn rewrite_leaves_other_lines_alone() {
    // An o= line that is not the six fields passes unchanged; so does a video
    // m-line.
    let body = "v=0\r\no=odd\r\nc=IN IP4 10.0.0.1\r\nm=video 5000 RTP/AVP 96\r\nm=audio 4000 RTP/AVP 0\r\n";
    let out = sdp::rewrite(body.as_bytes(), addr("10.9.9.9:1234"), "RTP/AVP").unwrap();
    assert_eq!(
        lines(&out),
        [
            "v=0",
            "o=odd",
            "c=IN IP4 10.9.9.9",
            "m=video 5000 RTP/AVP 96",
            "m=audio 1234 RTP/AVP 0",
            "",
        ]
    );
    assert_eq!(
        sdp::rewrite(b"", addr("10.9.9.9:1"), "RTP/AVP"),
        Ok(Vec::new())
    );
}

fn sdp_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]=[ -~]{0,40}",
        "c=IN IP[46] [0-9a-f.:]{0,20}(/[0-9]{1,3})?",
        "m=(audio|video) [0-9]{1,6}(/[0-9])? [A-Z/]{0,10}( [0-9]{1,3}){0,3}",
        "a=(crypto|rtcp):[ -~]{0,20}",
        "o=[a-z-]{1,5} [0-9]{1,5} [0-9]{1,5} IN IP4 [0-9.]{1,15}",
        "[ -~]{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}", port in any::<u16>()) {
        let _ = sdp::audio(text.as_bytes());
        let out = sdp::rewrite(text.as_bytes(), SocketAddr::new([127, 0, 0, 1].into(), port), "RTP/AVP");
        prop_assert!(out.is_ok(), "text always rewrites");
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let a = sdp::audio(&bytes);
        let r = sdp::rewrite(&bytes, addr("[::1]:5"), "RTP/SAVP");
        prop_assert_eq!(a == Err(SdpError::NotText), r.is_err());
    }

    #[test]
    fn sdp_like_lines(
        lines in proptest::collection::vec(sdp_line(), 0..16),
        v6 in any::<bool>(),
        port in 1u16..,
    ) {
        let body = lines.join("\r\n");
        let relay = if v6 {
            SocketAddr::new("2001:db8::1".parse().unwrap(), port)
        } else {
            SocketAddr::new("192.0.2.1".parse().unwrap(), port)
        };
        let before = sdp::audio(body.as_bytes());
        let out = sdp::rewrite(body.as_bytes(), relay, "RTP/AVP").unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        prop_assert!(text.is_empty() || text.ends_with("\r\n"));
        for l in text.split("\r\n") {
            prop_assert!(!l.starts_with("a=crypto:") && !l.starts_with("a=rtcp:"), "{l:?}");
        }
        // Whatever audio stream was there now points at the relay.
        if before.is_ok() {
            prop_assert_eq!(
                sdp::audio(&out),
                Ok(Audio { rtp: relay, proto: "RTP/AVP".into() })
            );
        }
    }
}
