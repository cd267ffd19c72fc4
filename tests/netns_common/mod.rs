//! Network namespaces for tests that need real IP hosts on one machine.
//!
//! [`Netns`] creates namespaces (and deletes them, with their veths, on drop);
//! [`KmeForward`] makes a KME that listens on the root namespace's loopback
//! reachable at the same address from inside a namespace, by a listener bound in
//! that namespace (`setns(2)` on one thread) whose connections are relayed to the
//! KME. The forwarder can refuse connections on demand: to the client inside,
//! that is a KME that went away. Tests need root (they create namespaces) and
//! send traffic only inside the namespaces they made.
#![allow(dead_code, missing_docs)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command inside namespace `ns`, returning (success, stdout + stderr).
pub fn in_ns(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Namespaces that exist while this value lives.
pub struct Netns {
    pub names: Vec<String>,
}

impl Netns {
    /// Creates namespaces `{prefix}{name}` for each name, loopback up, IPv6 off.
    pub fn create(prefix: &str, names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
        for n in &names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
            // IPv4 only: no link-local IPv6 chatter (router solicitations,
            // multicast listener reports) on links whose traffic tests inspect.
            for knob in ["all", "default"] {
                let (ok, out) = in_ns(
                    n,
                    &[
                        "sysctl",
                        "-qw",
                        &format!("net.ipv6.conf.{knob}.disable_ipv6=1"),
                    ],
                );
                assert!(ok, "{out}");
            }
        }
        Self { names }
    }

    /// A veth pair between two namespaces with an IPv4 address on each end.
    pub fn link(&self, a: &str, a_if: &str, a_addr: &str, b: &str, b_if: &str, b_addr: &str) {
        sh(&[
            "ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", ifname]);
            sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            // Processes still inside would keep it; the tests kill theirs first.
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Relays connections to `127.0.0.1:port` inside a namespace to the same
/// address in the root namespace.
pub struct KmeForward {
    up: Arc<AtomicBool>,
}

impl KmeForward {
    pub fn start(ns: &str, port: u16) -> Self {
        let up = Arc::new(AtomicBool::new(true));
        let root = File::open("/proc/self/ns/net").expect("own namespace");
        let target = File::open(format!("/var/run/netns/{ns}")).expect("namespace file");
        let (ltx, lrx) = std::sync::mpsc::channel();
        // A thread enters the namespace only to bind, then goes back.
        std::thread::spawn(move || {
            nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace");
            let l = TcpListener::bind(("127.0.0.1", port));
            nix::sched::setns(root.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns back");
            let _ = ltx.send(l);
        })
        .join()
        .expect("bind thread");
        let listener = lrx.recv().expect("listener").expect("bind in namespace");
        let flag = up.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(inner) = conn else { continue };
                if !flag.load(Ordering::SeqCst) {
                    let _ = inner.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(outer) = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))) else {
                    continue;
                };
                pipe(inner, outer, flag.clone());
            }
        });
        Self { up }
    }

    /// Refuse (false) or relay (true) connections from now on; refusing also
    /// cuts the connections already open.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

fn pipe(a: TcpStream, b: TcpStream, up: Arc<AtomicBool>) {
    for (mut from, mut to) in [
        (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
        (b, a),
    ] {
        let up = up.clone();
        std::thread::spawn(move || {
            let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 16384];
            loop {
                if !up.load(Ordering::SeqCst) {
                    break;
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
    }
}
