//! `qkdnet msg send` / `msg listen` as processes, against two KMEs run in this
//! test's process (the harness of `qkdnet-apps`' tests: alice at kme-a, bob and
//! carol at kme-b): a file with rekeys, standard input to standard output, and a
//! listener that refuses a stream addressed to someone else.

#[path = "apps_common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{Net, data};

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");

/// Starts `msg listen` on a free port; returns the child and its address.
fn listen(connect: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args([
            "msg",
            "listen",
            "--bind",
            "127.0.0.1:0",
            "--once",
            "--connect",
        ])
        .arg(connect)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qkdnet msg listen");
    // Byte by byte, so that nothing after the first line is taken from the pipe.
    let stderr = child.stderr.as_mut().expect("piped");
    let mut first = Vec::new();
    let mut b = [0u8; 1];
    while stderr.read(&mut b).expect("listener's first line") == 1 && b[0] != b'\n' {
        first.push(b[0]);
    }
    let first = text(&first);
    let addr = first
        .strip_prefix("listening on ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    (child, addr)
}

/// Runs `msg send` to `addr` with `stdin` on its standard input.
fn send(connect: &Path, addr: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(["msg", "send", "--addr", addr, "--connect"])
        .arg(connect)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qkdnet msg send");
    let mut input = child.stdin.take().expect("piped");
    input.write_all(stdin).expect("stdin");
    drop(input);
    child.wait_with_output().expect("send finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The KMEs serve from this runtime's workers while the processes run.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_and_standard_input_stream_between_processes() {
    let net = Net::start().await;
    let connect: PathBuf = net.path("connect.json");
    let plain = data(300_000, 7);
    let input = net.file("in.bin", &plain);
    let out = net.path("out.bin");
    let c = connect.clone();
    let (send_out, listen_out) = blocking(move || {
        let (listener, addr) = listen(&c, &["--as", "bob", "--out", out.to_str().expect("utf-8")]);
        let s = send(
            &c,
            &addr,
            &[
                "--from",
                "alice",
                "--to",
                "bob",
                "--in",
                input.to_str().expect("utf-8"),
                "--rekey-bytes",
                "100000",
                "--json",
            ],
            b"",
        );
        (s, listener.wait_with_output().expect("listener exits"))
    })
    .await;
    assert!(send_out.status.success(), "{}", text(&send_out.stderr));
    assert!(listen_out.status.success(), "{}", text(&listen_out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&send_out.stdout).expect("JSON report");
    assert_eq!(report["plaintext_bytes"], 300_000);
    assert_eq!(report["key_ids"].as_array().map(Vec::len), Some(3));
    assert!(std::fs::read(net.path("out.bin")).expect("output") == plain);
    assert!(text(&listen_out.stdout).starts_with("received 300000 bytes, alice -> bob"));

    // Standard input to standard output; the listener's report goes to stderr.
    let c = connect.clone();
    let (send_out, listen_out) = blocking(move || {
        let (listener, addr) = listen(&c, &["--as", "bob"]);
        let s = send(
            &c,
            &addr,
            &["--from", "alice", "--to", "bob"],
            b"hello over QKD\n",
        );
        (s, listener.wait_with_output().expect("listener exits"))
    })
    .await;
    assert!(send_out.status.success(), "{}", text(&send_out.stderr));
    assert_eq!(listen_out.stdout, b"hello over QKD\n");
    assert!(text(&listen_out.stderr).contains("received 15 bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_refuses_a_stream_for_another_sae() {
    let net = Net::start().await;
    let connect: PathBuf = net.path("connect.json");
    let out = net.path("carol.out");
    let c = connect.clone();
    let (send_out, listen_out) = blocking(move || {
        let (listener, addr) = listen(
            &c,
            &["--as", "carol", "--out", out.to_str().expect("utf-8")],
        );
        let s = send(&c, &addr, &["--from", "alice", "--to", "bob"], b"for bob");
        (s, listener.wait_with_output().expect("listener exits"))
    })
    .await;
    assert!(!send_out.status.success());
    assert!(
        text(&send_out.stderr).contains("did not confirm"),
        "{}",
        text(&send_out.stderr)
    );
    assert!(!listen_out.status.success());
    assert!(
        text(&listen_out.stderr).contains("addressed to SAE bob, not to carol"),
        "{}",
        text(&listen_out.stderr)
    );
    assert!(!net.path("carol.out").exists());
}
