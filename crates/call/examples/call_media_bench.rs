//! Per-packet cost of the edge's media work, what the relay adds to each
//! packet besides its UDP hop: `sm4` (SM4-GCM protect at the sending edge,
//! check-and-open at the receiving edge) and `srtp` (open the softphone's
//! SRTP and protect again under the quantum-derived key at the sending edge,
//! check at the receiving edge) and `otp` (one-time pad and Wegman–Carter tag
//! at the sending edge, check-and-open at the receiving edge, pad installed in
//! 16 KiB segments outside the timing), on G.711 packets (12-byte header, 160 bytes
//! of payload, 20 ms). Prints one JSON object; times in microseconds.
//!
//! ```sh
//! cargo run --release -p qkdnet-call --example call_media_bench -- --packets 200000
//! ```
#![allow(missing_docs)]

use std::time::Instant;

use qkdnet_call::media::{Direction, Protect, Unprotect};
use qkdnet_call::otp::{OtpRecv, OtpSend};
use qkdnet_call::srtp::{Context, MasterKey};
use qkdnet_media::Key256;

fn packet(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    p.extend((0..160).map(|i| (i as u8).wrapping_mul(7)));
    p
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut n = 200_000usize;
    while let Some(a) = args.next() {
        if a == "--packets" {
            n = args.next().and_then(|v| v.parse().ok()).unwrap_or(n);
        }
    }
    let key = Key256::new([7; 32]);
    // sm4: protect at one edge, open at the other.
    let mut tx = Protect::new(&key, Direction::CallerToCallee);
    let mut rx = Unprotect::new(&key, Direction::CallerToCallee);
    let (mut send, mut recv) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let mut p = packet(i as u16);
        let t = Instant::now();
        tx.rtp(&mut p).expect("protect");
        send.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        rx.open(&mut p).expect("open");
        recv.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // srtp: the softphone's SRTP opened and protected again, then checked.
    let ua = MasterKey::from_bytes(&[1; 30]).expect("30");
    let q = MasterKey::from_bytes(&[2; 30]).expect("30");
    let (mut phone, mut ua_in, mut q_out, mut q_check) = (
        Context::new(&ua),
        Context::new(&ua),
        Context::new(&q),
        Context::new(&q),
    );
    let (mut s_send, mut s_recv) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let mut p = packet(i as u16);
        phone.protect_rtp(&mut p).expect("phone");
        let t = Instant::now();
        ua_in.unprotect_rtp(&mut p).expect("open");
        q_out.protect_rtp(&mut p).expect("protect");
        s_send.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let mut copy = p.clone();
        q_check.unprotect_rtp(&mut copy).expect("check");
        s_recv.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // otp: pad segments of 16 keys of 8192 bits, as the edge fetches them.
    let (mut o_tx, mut o_rx) = (OtpSend::new(), OtpRecv::new());
    let (mut o_send, mut o_recv) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if o_tx.remaining() < 16 * 1024 {
            let pad = zeroize::Zeroizing::new(vec![(i % 251) as u8; 16 * 1024]);
            let start = o_tx.install(pad.clone());
            o_rx.install(start, pad);
        }
        let mut p = packet(i as u16);
        let t = Instant::now();
        o_tx.protect(&mut p).expect("pad");
        o_send.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        o_rx.open(&mut p).expect("open");
        o_recv.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let pad_per_packet = o_tx.used_bytes as f64 / n as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "call_media", "packets": n, "payload_bytes": 160,
            "sm4_send_us_p50": pct(&mut send, 0.5), "sm4_send_us_p99": pct(&mut send, 0.99),
            "sm4_recv_us_p50": pct(&mut recv, 0.5), "sm4_recv_us_p99": pct(&mut recv, 0.99),
            "srtp_send_us_p50": pct(&mut s_send, 0.5), "srtp_send_us_p99": pct(&mut s_send, 0.99),
            "srtp_recv_us_p50": pct(&mut s_recv, 0.5), "srtp_recv_us_p99": pct(&mut s_recv, 0.99),
            "otp_send_us_p50": pct(&mut o_send, 0.5), "otp_send_us_p99": pct(&mut o_send, 0.99),
            "otp_recv_us_p50": pct(&mut o_recv, 0.5), "otp_recv_us_p99": pct(&mut o_recv, 0.99),
            "otp_pad_bytes_per_packet": pad_per_packet,
        })
    );
}
