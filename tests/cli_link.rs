//! `qkdnet link …` as a user runs it: outputs, files, and clear refusals.

use assert_cmd::Command;

fn qkdnet() -> Command {
    Command::cargo_bin("qkdnet").expect("binary built")
}

fn fails_with(args: &[&str], needle: &str) {
    let out = qkdnet().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(needle),
        "{args:?}: stderr lacks '{needle}':\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

#[test]
fn keyrate_json_has_the_documented_fields() {
    let out = qkdnet()
        .args([
            "link",
            "keyrate",
            "--preset",
            "gys2004",
            "--model",
            "decoy-inf",
            "--distance",
            "0:100:50",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let max = v["max_distance_km"].as_f64().unwrap();
    assert!((max - 142.2).abs() < 1.0, "{max}");
    let pts = v["points"].as_array().unwrap();
    assert_eq!(pts.len(), 3);
    for k in [
        "distance_km",
        "loss_db",
        "gain",
        "qber",
        "key_rate_per_pulse",
        "key_rate_bps",
    ] {
        assert!(pts[1][k].is_number(), "{k} missing");
    }
    assert!((pts[1]["loss_db"].as_f64().unwrap() - 10.5).abs() < 1e-9);
}

#[test]
fn keyrate_plots_svg_and_png() {
    let dir = std::env::temp_dir().join(format!("qkdnet-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for ext in ["svg", "png"] {
        let f = dir.join(format!("rate.{ext}"));
        qkdnet()
            .args([
                "link",
                "keyrate",
                "--preset",
                "lim2014",
                "--model",
                "finite",
                "--block",
                "1e7",
                "--distance",
                "0:150:30",
                "--plot",
            ])
            .arg(&f)
            .assert()
            .success();
        let bytes = std::fs::read(&f).unwrap();
        assert!(bytes.len() > 1000, "{ext} plot too small");
        if ext == "png" {
            assert_eq!(&bytes[1..4], b"PNG");
        } else {
            assert!(String::from_utf8_lossy(&bytes).contains("PLOB"));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn simulate_writes_records_and_reports_classes() {
    let dir = std::env::temp_dir().join(format!("qkdnet-sim-{}", std::process::id()));
    let out = qkdnet()
        .args([
            "link",
            "simulate",
            "--preset",
            "metro-1ghz",
            "--distance",
            "20",
            "--pulses",
            "2e6",
            "--seed",
            "3",
            "--json",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["classes"].as_array().unwrap().len(), 3);
    assert!(v["detections"].as_u64().unwrap() > 1000);
    let bob = std::fs::read(dir.join("bob.rec")).unwrap();
    let n = qkdnet_optics::record::BobReader::new(&bob[..])
        .unwrap()
        .read_all()
        .unwrap()
        .len();
    assert_eq!(n as u64, v["detections"].as_u64().unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_refused_clearly() {
    fails_with(
        &["link", "keyrate", "--preset", "nope"],
        "unknown preset 'nope'",
    );
    fails_with(
        &["link", "keyrate", "--preset", "gys2004", "--distance", "-5"],
        "'-5'",
    );
    fails_with(
        &[
            "link",
            "keyrate",
            "--preset",
            "gys2004",
            "--distance",
            "10:5:1",
        ],
        "START <= STOP",
    );
    fails_with(
        &[
            "link",
            "keyrate",
            "--preset",
            "gys2004",
            "--distance",
            "1:2:3:4",
        ],
        "START:STOP:STEP",
    );
    fails_with(
        &["link", "keyrate", "--preset", "gys2004", "--model", "magic"],
        "unknown model",
    );
    fails_with(
        &[
            "link", "keyrate", "--preset", "gys2004", "--model", "finite", "--block", "10",
        ],
        "block size",
    );
    fails_with(
        &[
            "link",
            "keyrate",
            "--preset",
            "qd-sps-2025",
            "--model",
            "decoy-inf",
        ],
        "use 'sps'",
    );
    fails_with(
        &["link", "simulate", "--preset", "gys2004", "--distance=-1"],
        "distance",
    );
    fails_with(
        &[
            "link", "simulate", "--preset", "gys2004", "--pulses", "lots",
        ],
        "--pulses",
    );
    fails_with(
        &["link", "simulate", "--preset", "gys2004", "--pulses", "0"],
        "--pulses",
    );
    fails_with(
        &[
            "link",
            "simulate",
            "--preset",
            "gys2004",
            "--eve",
            "intercept-resend:2",
        ],
        "[0, 1]",
    );
    fails_with(
        &[
            "link",
            "simulate",
            "--preset",
            "micius2017",
            "--distance",
            "100",
        ],
        "horizon",
    );
    fails_with(
        &[
            "link",
            "keyrate",
            "--preset",
            "gys2004",
            "--plot",
            "/tmp/x.jpg",
        ],
        ".svg or .png",
    );
    // a preset file with an impossible efficiency
    let f = std::env::temp_dir().join(format!("bad-{}.toml", std::process::id()));
    let text = qkdnet_optics::preset::text("gys2004")
        .unwrap()
        .replace("efficiency = 0.045", "efficiency = 1.5");
    std::fs::write(&f, text).unwrap();
    fails_with(
        &["link", "keyrate", "--preset", f.to_str().unwrap()],
        "must be a probability in [0, 1], got 1.5",
    );
    std::fs::remove_file(&f).ok();
    fails_with(
        &["link", "keyrate", "--preset", "/no/such/file.toml"],
        "reading preset file",
    );
}
