//! `qkdnet media init | status` as a user runs them: the PIN from the
//! environment or a private file, never from the command line; clear errors
//! for a wrong PIN, a missing PIN, an existing file and a file that is not a
//! medium; status never shows a key.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qkdnet-media-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn media(args: &[&str], pin: Option<&str>) -> Output {
    let mut c = Command::new(BIN);
    c.arg("media").args(args).env_remove("QKDNET_MEDIA_PIN");
    if let Some(p) = pin {
        c.env("QKDNET_MEDIA_PIN", p);
    }
    c.output().expect("run qkdnet")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_medium_is_created_and_reported_and_bad_pins_and_files_are_refused() {
    let dir = temp("init");
    let file = dir.join("alice.medium");
    let f = file.to_str().expect("utf-8");
    let owner = "sip:alice@example.net";
    let o = media(
        &[
            "init",
            "--medium",
            f,
            "--owner",
            owner,
            "--capacity",
            "5000",
        ],
        Some("246810"),
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains(owner) && out.contains("5000"), "{out}");

    let o = media(&["status", "--medium", f, "--json"], Some("246810"));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["owner"], owner);
    assert_eq!(v["capacity"], 5000);
    assert_eq!(v["remaining"], 0);
    assert_eq!(v["charges"].as_array().map(Vec::len), Some(0));
    let o = media(&["status", "--medium", f], Some("246810"));
    assert!(text(&o).0.contains("none yet"), "{}", text(&o).0);

    // A PIN file must be private; a private one works.
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, "246810\n").expect("pin file");
    let with_pin_file = || {
        let p = pin_file.to_str().expect("utf-8");
        media(&["status", "--medium", f, "--pin-file", p], None)
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let o = with_pin_file();
        assert!(!o.status.success(), "a world-readable PIN file was used");
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let o = with_pin_file();
    assert!(o.status.success(), "{}", text(&o).1);

    // Wrong PIN, no PIN, an existing file, a file that is not a medium.
    let o = media(&["status", "--medium", f], Some("135790"));
    assert!(!o.status.success());
    assert!(text(&o).1.contains("wrong PIN"), "{}", text(&o).1);
    let o = media(&["status", "--medium", f], None);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("QKDNET_MEDIA_PIN is not set"),
        "{}",
        text(&o).1
    );
    let o = media(
        &["init", "--medium", f, "--owner", "sip:eve@example.net"],
        Some("1"),
    );
    assert!(!o.status.success(), "an existing medium was overwritten");
    assert!(text(&o).1.contains("File exists"), "{}", text(&o).1);
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).expect("junk");
    let o = media(
        &["status", "--medium", junk.to_str().expect("utf-8")],
        Some("1"),
    );
    assert!(!o.status.success());
    assert!(text(&o).1.contains("not a qkdnet medium"), "{}", text(&o).1);
    // The medium still opens with its PIN after all that.
    let o = media(&["status", "--medium", f], Some("246810"));
    assert!(o.status.success(), "{}", text(&o).1);
    let _ = std::fs::remove_dir_all(&dir);
}
