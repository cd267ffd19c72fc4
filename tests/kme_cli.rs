//! `qkdnet pki` and `qkdnet kme` command lines: files, permissions, refusals.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run qkdnet")
}

#[test]
fn pki_init_and_issue_write_certificates_and_private_keys() {
    let dir = std::env::temp_dir().join(format!("qkdnet-kme-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().expect("utf-8 path");
    assert!(run(&["pki", "init", d]).status.success());
    assert!(
        !run(&["pki", "init", d]).status.success(),
        "an existing CA is never overwritten"
    );
    let out = run(&[
        "pki",
        "issue",
        "--dir",
        d,
        "--kme",
        "kme-a",
        "--san",
        "127.0.0.1",
        "--san",
        "kme-a.example",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        run(&["pki", "issue", "--dir", d, "--sae", "alice"])
            .status
            .success()
    );
    assert!(
        !run(&["pki", "issue", "--dir", d, "--sae", "alice"])
            .status
            .success(),
        "no overwrite"
    );
    assert!(
        !run(&["pki", "issue", "--dir", d, "--sae", "bad id"])
            .status
            .success(),
        "invalid ID refused"
    );
    assert!(
        !run(&["pki", "issue", "--dir", d, "--sae", "x", "--kme", "y"])
            .status
            .success()
    );
    for f in ["ca.pem", "kme-kme-a.pem", "sae-alice.pem"] {
        let text = std::fs::read_to_string(dir.join(f)).expect("certificate");
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{f}");
    }
    #[cfg(unix)]
    for f in ["ca.key", "kme-kme-a.key", "sae-alice.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(f))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} must not be readable by others");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kme_serve_refuses_a_bad_configuration() {
    let dir = std::env::temp_dir().join(format!("qkdnet-kme-cli-cfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "kme_id = \"a b\"\nlisten = \"127.0.0.1:0\"\n").expect("write");
    let out = run(&["kme", "serve", "--config", cfg.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error"));
    let out = run(&["kme", "serve", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("qkdnet kme serve --config"));
    let _ = std::fs::remove_dir_all(&dir);
}
