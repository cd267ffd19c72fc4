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

#[test]
fn kme_master_key_makes_a_file_or_a_token_key_and_never_replaces_one() {
    let dir = std::env::temp_dir().join(format!("qkdnet-kme-cli-mk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // A key file: 32 bytes, mode 0600, kept on a second run.
    let file = dir.join("master.key");
    let f = file.to_str().expect("utf-8");
    let out = run(&["kme", "master-key", "--file", f]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("created the node master key file"));
    let bytes = std::fs::read(&file).expect("key file");
    assert_eq!(bytes.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = run(&["kme", "master-key", "--file", f]);
    assert!(text(&out).contains("kept the existing"), "{}", text(&out));
    assert_eq!(std::fs::read(&file).expect("key file"), bytes);
    assert!(
        !run(&["kme", "master-key"]).status.success(),
        "a source is required"
    );

    // A key in the test token of scripts/softhsm.sh (unset: skipped, except in CI).
    let env = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
    let (Some(module), Some(token), Some(pin)) = (
        env("QKDNET_TEST_PKCS11_MODULE"),
        env("QKDNET_TEST_PKCS11_TOKEN"),
        env("QKDNET_TEST_PKCS11_PIN_FILE"),
    ) else {
        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "false" | "0"));
        assert!(
            !ci,
            "QKDNET_TEST_PKCS11_* not set, and CI must not skip the PKCS#11 token: \
             export the lines scripts/softhsm.sh prints"
        );
        eprintln!("kme master-key --pkcs11-module: skipped (run scripts/softhsm.sh)");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    // One fixed label: the first run ever creates it, every later one keeps it.
    let args = [
        "kme",
        "master-key",
        "--pkcs11-module",
        &module,
        "--token-label",
        &token,
        "--key-label",
        "qkdnet-cli-test",
        "--pin-file",
        &pin,
    ];
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("node master key 'qkdnet-cli-test'"));
    let out = run(&args);
    assert!(text(&out).contains("kept the existing"), "{}", text(&out));
    let mut wrong = args;
    wrong[5] = "no-such-token";
    let out = run(&wrong);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no token with this label"),
        "{}",
        text(&out)
    );
    let pin_text = std::fs::read_to_string(&pin).expect("PIN");
    assert!(!text(&out).contains(pin_text.trim()), "the PIN was printed");
    let _ = std::fs::remove_dir_all(&dir);
}
