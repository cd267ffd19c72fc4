//! `qkdnet msg send` / `msg listen` as processes, against two KMEs run in this
//! test's process (the harness of `qkdnet-apps`' tests: alice at kme-a, bob and
//! carol at kme-b): a file with rekeys, standard input to standard output, and a
//! listener that refuses a stream addressed to someone else; `msg open` with the
//! key cache (#27) and killed mid-way (#18).

#[path = "apps_common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{Net, data};
use qkdnet_apps::seal::SealOptions;

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

// ---- msg open: key cache (#27) and crash safety (#18) ----

/// Runs `msg open --connect C --as bob ARGS…` to completion.
fn bob_open(connect: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["msg", "open", "--as", "bob", "--connect"])
        .arg(connect)
        .args(args)
        .output()
        .expect("run qkdnet msg open")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Seals `plain` from alice for bob into `name` (in the test's directory).
async fn seal_for_bob(net: &Net, name: &str, plain: &[u8], opts: &SealOptions) -> PathBuf {
    let input = net.file(&format!("{name}.plain"), plain);
    let out = net.path(name);
    qkdnet_apps::seal(&net.client("alice"), "alice", "bob", &input, &out, opts)
        .await
        .expect("seal");
    out
}

fn small() -> SealOptions {
    SealOptions {
        chunk_size: 1024,
        rekey_bytes: 4096,
        ..SealOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_27_msg_open_twice_after_a_tampered_copy_and_expiry() {
    let net = Net::start().await;
    let connect = net.path("connect.json");
    let plain = data(10_000, 31);
    let orig = seal_for_bob(&net, "orig.sealed", &plain, &small()).await;
    let mut bytes = std::fs::read(&orig).expect("sealed");
    let n = bytes.len();
    bytes[n - 40] ^= 1;
    let copy = net.file("copy.sealed", &bytes);
    let short = seal_for_bob(&net, "short.sealed", b"short-lived", &small()).await;
    let (out1, out2, out3) = (net.path("o1"), net.path("o2"), net.path("o3"));
    let dir = net.dir.clone();
    let cache_dir = net.path("keycache/bob");
    blocking(move || {
        // The damaged copy first: an integrity error that says the keys are kept.
        let o = bob_open(&connect, &["--in", s(&copy), "--out", s(&out1)]);
        assert!(!o.status.success());
        let err = text(&o.stderr);
        assert!(
            err.contains("integrity check failed") && err.contains("stay in the key cache"),
            "{err}"
        );
        common::assert_no_output(&dir, "o1");
        // The original opens, and opens again.
        let o = bob_open(&connect, &["--in", s(&orig), "--out", s(&out1)]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains("keys: 3 from the key cache, 0 from the KME"),
            "{}",
            text(&o.stdout)
        );
        let o = bob_open(&connect, &["--in", s(&orig), "--out", s(&out2), "--json"]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let rep: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
        assert_eq!(rep["keys_from_cache"], 3);
        assert_eq!(rep["plaintext_bytes"], 10_000);
        assert!(std::fs::read(&out1).expect("o1") == plain);
        assert!(std::fs::read(&out2).expect("o2") == plain);

        // A lifetime of zero: the keys serve this open only; the next run deletes them.
        let o = bob_open(
            &connect,
            &["--in", s(&short), "--out", s(&out3), "--keep", "0s"],
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(std::fs::read(&out3).expect("o3"), b"short-lived");
        let o = bob_open(&connect, &["--in", s(&short), "--out", s(&out3)]);
        assert!(!o.status.success());
        let err = text(&o.stderr);
        assert!(
            err.contains("no longer has the keys") && err.contains("no cached keys for it in"),
            "{err}"
        );
        let entries = |dir: &Path| -> usize {
            std::fs::read_dir(dir)
                .expect("key cache")
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".qkc"))
                .count()
        };
        assert_eq!(entries(&cache_dir), 3, "only orig's keys remain");

        // msg forget discards them; the file then no longer opens here.
        let o = Command::new(BIN)
            .args(["msg", "forget", "--as", "bob", "--connect"])
            .arg(&connect)
            .args(["--in", s(&orig)])
            .output()
            .expect("run qkdnet msg forget");
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains("deleted 3 cached keys"),
            "{}",
            text(&o.stdout)
        );
        assert_eq!(entries(&cache_dir), 0);
        let o = bob_open(&connect, &["--in", s(&orig), "--out", s(&out1)]);
        assert!(!o.status.success());
    })
    .await;
}

/// Bytes the process has read so far (Linux), to kill it at a known point.
fn bytes_read(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
}

/// The files in `dir` with their contents.
fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap_or_default())
        })
        .collect()
}

/// Runs `msg open` of `sealed` into `out`, killing it with SIGKILL once it has
/// read `kill_at` bytes; `check` sees the output directory at every poll.
/// Returns whether it was killed.
fn open_and_kill(
    connect: &Path,
    sealed: &Path,
    out: &Path,
    kill_at: u64,
    mut check: impl FnMut(),
) -> bool {
    let mut child = Command::new(BIN)
        .args(["msg", "open", "--as", "bob", "--connect"])
        .arg(connect)
        .args(["--in", s(sealed), "--out", s(out)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qkdnet msg open");
    loop {
        check();
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        if bytes_read(child.id()).is_some_and(|n| n >= kill_at) {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
            check();
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Issue #18 item 9: `msg open` killed at any moment leaves no plaintext that was
/// not authenticated, and the next open removes what a killed one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_18_a_killed_msg_open_leaves_no_unauthenticated_plaintext() {
    let net = Net::start().await;
    let connect = net.path("connect.json");
    let plain = data(48 << 20, 41);
    let sealed = seal_for_bob(&net, "big.sealed", &plain, &SealOptions::default()).await;
    let len = std::fs::metadata(&sealed).expect("sealed").len();
    let mut bytes = std::fs::read(&sealed).expect("sealed");
    bytes[len as usize - 100] ^= 1; // the last chunk
    let bad = net.file("bad.sealed", &bytes);
    drop(bytes);
    let out_dir = net.path("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let out = out_dir.join("big.bin");
    blocking(move || {
        // The tampered file, killed halfway through (or failing on its own): the
        // output directory never holds a byte of plaintext.
        let killed = open_and_kill(&connect, &bad, &out, len / 2, || {
            for (name, content) in files_in(&out_dir) {
                assert!(content.is_empty(), "{name} holds {} bytes", content.len());
            }
        });
        eprintln!("tampered copy killed mid-way: {killed}");
        assert!(!out.exists());

        // The original, killed during its second pass: what it left holds only
        // authenticated plaintext (a prefix of the file).
        let killed = open_and_kill(&connect, &sealed, &out, len + len / 2, || {});
        eprintln!("original killed in its second pass: {killed}");
        let left = files_in(&out_dir);
        for (name, content) in &left {
            assert!(
                plain.starts_with(content),
                "{name} holds {} bytes that are not the file's",
                content.len()
            );
        }
        if killed {
            assert!(
                left.iter().any(|(n, _)| n.contains(".qkdnet-open-")),
                "a stale temporary output: {left:?}"
            );
        }
        // The next open removes what the killed ones left and opens the file with
        // the keys the first one kept in the cache.
        let o = bob_open(&connect, &["--in", s(&sealed), "--out", s(&out)]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let left = files_in(&out_dir);
        assert_eq!(
            left.len(),
            1,
            "{:?}",
            left.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        assert_eq!(left[0].0, "big.bin");
        assert!(left[0].1 == plain);
    })
    .await;
}
