//! Fixtures shared by the call crate's tests.

/// baresip 1.0's offer (the body of its INVITE, captured on loopback).
pub const BARESIP_SDP: &str = "v=0\r\n\
o=- 1373204154 2010624654 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
a=tool:baresip 1.0.0\r\n\
m=audio 20006 RTP/SAVP 0 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=sendrecv\r\n\
a=label:1\r\n\
a=rtcp-rsize\r\n\
a=ssrc:2851979417 cname:sip:alice@127.0.0.1:15060\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:H61/w5ajLVqUgYU0mwTl3zftmTdGYVZ2WxfvYQs2\r\n\
a=minptime:20\r\n\
a=ptime:20\r\n";
