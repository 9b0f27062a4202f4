//! The `quicseal` binary as a real process: demo, listen and send.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_quicseal");

fn write_node(dir: &Path, pki: &Pki, name: &str) {
    let issued = pki.issue(&pki.cert(name));
    std::fs::write(dir.join(format!("{name}.crt")), issued.chain_pem).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), issued.key_pem).unwrap();
}

/// A temp dir with `ca.crt` and a certificate and key for each of `nodes`.
fn pki_dir(pki: &Pki, nodes: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), pki.ca.cert_pem()).unwrap();
    for node in nodes {
        write_node(dir.path(), pki, node);
    }
    dir
}

fn tls_args(dir: &Path, name: &str, ca: &str) -> Vec<String> {
    vec![
        "--cert".into(),
        dir.join(format!("{name}.crt")).display().to_string(),
        "--key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--ca".into(),
        dir.join(ca).display().to_string(),
    ]
}

/// Starts `quicseal listen` and returns it with the address it printed.
fn start_listener(dir: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .arg("listen")
        .args(tls_args(dir, "server", "ca.crt"))
        .args(["--bind", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
    let addr = first.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{first:?}")).to_owned();
    (child, addr)
}

fn send(dir: &Path, name: &str, ca: &str, to: &str, timeout: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("send")
        .args(tls_args(dir, name, ca))
        .args(["--to", to, "--name", "server", "--timeout", timeout])
        .args(extra)
        .output()
        .unwrap()
}

fn wait_with_deadline(mut child: Child) -> Output {
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("process did not exit: {:?}", child.wait_with_output().unwrap());
}

#[test]
fn demo_runs_and_passes_its_checks() {
    let out = Command::new(BIN).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("result   OK"), "{stdout}");
    assert!(stdout.contains("mallory"), "{stdout}");
    assert!(stdout.contains("refused 1 replay(s), 1 tag failure(s)"), "{stdout}");
}

#[test]
fn send_exits_zero_only_after_the_listener_confirmed() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server", "client"]);
    let (listener, addr) = start_listener(dir.path(), &["--count", "1"]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["hello there"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("delivered message #1 on channel 0 to server"), "{stdout}");
    let listened = wait_with_deadline(listener);
    assert!(listened.status.success());
    let printed = String::from_utf8_lossy(&listened.stdout);
    assert!(printed.contains("from client [") && printed.contains("channel 0 #1: hello there"), "{printed}");
}

/// A peer's payload cannot put escape sequences or line breaks on the operator's terminal.
#[test]
fn listen_escapes_control_characters_in_payloads() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server", "client"]);
    let (listener, addr) = start_listener(dir.path(), &["--count", "1"]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["red\x1b[31m\nforged"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listened = wait_with_deadline(listener);
    let printed = String::from_utf8_lossy(&listened.stdout);
    assert!(printed.contains("#1: red\\u{1b}[31m\\u{a}forged"), "{printed}");
    assert!(!printed.contains('\x1b'), "{printed}");
}

#[test]
fn send_fails_with_the_reason() {
    let pki = Pki::new("ca");
    let rogue = Pki::new("rogue");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), pki.ca.cert_pem()).unwrap();
    write_node(dir.path(), &pki, "server");
    write_node(dir.path(), &rogue, "mallory");
    let (mut listener, addr) = start_listener(dir.path(), &[]);

    // A certificate from another CA: the listener refuses it.
    let out = send(dir.path(), "mallory", "ca.crt", &addr, "5", &["let me in"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UnknownCA"), "{stderr}");

    // The listener refuses by policy.
    listener.kill().unwrap();
    let _ = listener.wait();
    write_node(dir.path(), &pki, "client");
    let (mut listener, addr) = start_listener(dir.path(), &["--allow", "someone-else"]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthorized"));
    listener.kill().unwrap();
    let _ = listener.wait();

    // Nobody listening: a timeout, not a hang.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent = sock.local_addr().unwrap().to_string();
    let out = send(dir.path(), "client", "ca.crt", &silent, "1", &["anyone?"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).arg("listen").args(tls_args(dir.path(), "nobody", "ca.crt")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nobody.crt") && stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn send_through_the_fault_injecting_proxy() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server", "client"]);
    let (listener, addr) = start_listener(dir.path(), &["--count", "1"]);
    let mut proxy = Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--target", &addr])
        .args(["--loss", "0.05", "--dup", "0.1", "--reorder", "0.3", "--corrupt", "0.02", "--seed", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(proxy.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
    let via = first.split_whitespace().nth(3).unwrap_or_else(|| panic!("{first:?}")).to_owned();
    // Lost handshake packets cost QUIC whole probe timeouts (1 s, 2 s, ...): a generous limit.
    let out = send(dir.path(), "client", "ca.crt", &via, "30", &["through a bad link"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Interrupted, the proxy prints its report and exits.
    let status = Command::new("kill").args(["-INT", &proxy.id().to_string()]).status().unwrap();
    assert!(status.success());
    let proxied = wait_with_deadline(proxy);
    let report = String::from_utf8_lossy(&proxied.stdout);
    assert!(report.contains("NetsimStats") && report.contains("received"), "{report}");
    let listened = wait_with_deadline(listener);
    assert!(String::from_utf8_lossy(&listened.stdout).contains("through a bad link"));
}

#[test]
fn proxy_refuses_bad_arguments() {
    let out = Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--loss", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loss must be between 0 and 1"));
    let out = Command::new(BIN).args(["proxy", "--listen", "127.0.0.1:0", "--target", "10.1.2.3:9"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
