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

/// A child process that is killed when the test is done with it, or fails before it exits (a
/// listener that waits for a message would otherwise outlive a failed test).
struct Running(Option<Child>);

impl From<Child> for Running {
    fn from(child: Child) -> Running {
        Running(Some(child))
    }
}

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("not yet waited for")
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("not yet waited for")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `quicseal listen` with the certificate files of "server" in `dir`, and returns it
/// with the address it printed.
fn start_listener(dir: &Path, extra: &[&str]) -> (Running, String) {
    let mut args = tls_args(dir, "server", "ca.crt");
    args.extend(extra.iter().map(|a| a.to_string()));
    start_listener_with(&args)
}

/// Starts `quicseal listen --bind 127.0.0.1:0` with `args`, and returns it with the address it
/// printed.
fn start_listener_with(args: &[String]) -> (Running, String) {
    let mut child = Command::new(BIN)
        .arg("listen")
        .args(["--bind", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
    let addr = match first.trim().strip_prefix("listening on ") {
        Some(addr) => addr.to_owned(),
        None => {
            let event: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|_| panic!("{first:?}"));
            assert_eq!(event["event"], "listening", "{first:?}");
            event["address"].as_str().unwrap().to_owned()
        }
    };
    (child.into(), addr)
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

fn wait_with_deadline(child: impl Into<Running>) -> Output {
    let mut running = child.into();
    for _ in 0..200 {
        if running.try_wait().unwrap().is_some() {
            let child = running.0.take().expect("not yet waited for");
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut child = running.0.take().expect("not yet waited for");
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

    // A certificate from another CA: the listener refuses it (exit 2: TLS).
    let out = send(dir.path(), "mallory", "ca.crt", &addr, "5", &["let me in"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("alert UnknownCA (it does not trust the CA of our certificate)"), "{stderr}");
    assert!(stderr.contains(&addr) && stderr.lines().filter(|l| l.starts_with("error")).count() == 1, "{stderr}");

    // The listener refuses by policy.
    listener.kill().unwrap();
    let _ = listener.wait();
    write_node(dir.path(), &pki, "client");
    let (mut listener, addr) = start_listener(dir.path(), &["--allow", "someone-else"]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["hi"]);
    assert_eq!(out.status.code(), Some(3), "policy refusals exit 3");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthorized"));
    listener.kill().unwrap();
    let _ = listener.wait();

    // Nobody listening: a timeout, not a hang, that says no node answered there (exit 4).
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent = sock.local_addr().unwrap().to_string();
    let out = send(dir.path(), "client", "ca.crt", &silent, "1", &["anyone?"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&silent) && stderr.contains("no quicseal node answered at that address"), "{stderr}");
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
    assert!(report.contains("proxy stopped: received ") && !report.contains("NetsimStats"), "{report}");
    let listened = wait_with_deadline(listener);
    assert!(String::from_utf8_lossy(&listened.stdout).contains("through a bad link"));
}

#[test]
fn proxy_refuses_bad_arguments() {
    let out = Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--loss", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 is not a chance: give 0 to 1"));
    let out = Command::new(BIN).args(["proxy", "--listen", "127.0.0.1:0", "--target", "10.1.2.3:9"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

/// Runs `quicseal ARGS...` and returns it (stdin closed).
fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap()
}

/// Asserts a failure with exit code 1 and one error line on stderr that contains `needle`
/// (and no panic, no `Debug` dump).
fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("{ ") && !stderr.contains("Error("), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "{stderr}");
}

#[test]
fn numbers_from_the_command_line_are_checked_instead_of_panicking() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server", "client"]);
    let d = dir.path().to_str().unwrap();
    let cert = dir.path().join("client.crt");
    let cert = cert.to_str().unwrap();
    for (args, needle) in [
        (vec!["cert", "init", "--name", "x", "--out", d, "--days", "4000000"], "out of range: give 1 to 36500"),
        (vec!["cert", "issue", "n", "--ca-dir", d, "--days", "4000000"], "out of range"),
        (vec!["cert", "issue", "n", "--ca-dir", d, "--days", "0"], "out of range"),
        (vec!["cert", "renew", cert, "--ca-dir", d, "--days", "4000000"], "out of range"),
        (vec!["cert", "crl", "--ca-dir", d, "--days", "4000000"], "out of range"),
        (vec!["proxy", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--duration", "1e30"], "out of range"),
        (
            vec!["proxy", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--delay-ms", "99999999999"],
            "out of range",
        ),
        (vec!["send", "--to", "127.0.0.1:9", "--name", "s", "--timeout", "1e30", "m"], "out of range"),
        (vec!["send", "--to", "127.0.0.1:9", "--name", "s", "--timeout", "1e-12", "m"], "out of range"),
        (vec!["send", "--to", "127.0.0.1:9", "--name", "s", "--timeout", "NaN", "m"], "out of range"),
        (vec!["send", "--to", "nowhere", "--name", "s", "m"], "give HOST:PORT or IP:PORT"),
    ] {
        let mut full: Vec<&str> = args.clone();
        if full[0] == "send" {
            full.extend(["--cert", cert, "--key", cert, "--ca", cert]);
        }
        fails_with(&run(&full), needle);
    }
}

#[test]
fn send_takes_host_names_and_standard_input_and_prints_json() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server", "client"]);
    let (listener, addr) = start_listener(dir.path(), &["--count", "2", "--json"]);
    let port = addr.rsplit(':').next().unwrap();
    let mut child = Command::new(BIN)
        .arg("send")
        .args(tls_args(dir.path(), "client", "ca.crt"))
        .args(["--to", &format!("localhost:{port}"), "--name", "server", "--timeout", "10", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"from stdin\n").unwrap();
    let out = wait_with_deadline(child);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = send(dir.path(), "client", "ca.crt", &addr, "10", &["--json", "second"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (sent["delivered"].as_bool(), sent["seq"].as_u64(), sent["channel"].as_u64()),
        (Some(true), Some(1), Some(0))
    );

    let listened = wait_with_deadline(listener);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&listened.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let texts: Vec<&str> =
        events.iter().filter(|e| e["event"] == "message").map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["from stdin\n", "second"]);
    assert_eq!(events[1]["peer"], "client");
    assert_eq!(events[1]["fingerprint"].as_str().unwrap().len(), 64);

    // A refusal is a JSON object too, on each side: send's outcome with its exit code, and the
    // listener's refusal event.
    let (mut listener, addr) = start_listener(dir.path(), &["--allow", "someone-else", "--json"]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["--json", "hi"]);
    assert_eq!(out.status.code(), Some(3));
    let refused: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((refused["delivered"].as_bool(), refused["exit_code"].as_u64()), (Some(false), Some(3)));
    let mut lines = BufReader::new(listener.stdout.take().unwrap()).lines();
    let event: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(event["event"], "refused", "{event}");
    assert!(event["error"].as_str().unwrap().contains("unauthorized"), "{event}");
    listener.kill().unwrap();
    let _ = listener.wait();
}

/// Accepts sessions and never reads them: a sent message is never acknowledged.
#[test]
fn a_message_the_listener_never_takes_exits_5() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["client"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let node = bind(quicseal::NodeConfig::new(pki.identity("server"), pki.trust()));
    let addr = node.local_addr().unwrap().to_string();
    let holder = runtime.spawn({
        let node = node.clone();
        async move {
            let mut held = Vec::new();
            while let Ok(s) = node.accept().await {
                held.push(s);
            }
        }
    });
    let out = send(dir.path(), "client", "ca.crt", &addr, "1", &["never read"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sent, but not acknowledged"));
    holder.abort();
}

#[test]
fn listen_and_send_refuse_certificates_that_cannot_work() {
    use quicseal::pki::Usage;
    use std::time::SystemTime;
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server"]);
    let write = |name: &str, issued: quicseal::pki::Issued| {
        std::fs::write(dir.path().join(format!("{name}.crt")), issued.chain_pem).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), issued.key_pem).unwrap();
    };
    let past = SystemTime::now() - Duration::from_secs(10 * 86_400);
    write("expired", pki.issue(&pki.cert("expired").validity(past - Duration::from_secs(86_400), past)));
    write("clientonly", pki.issue(&pki.cert("clientonly").usage(Usage::ClientOnly)));
    write("serveronly", pki.issue(&pki.cert("serveronly").usage(Usage::ServerOnly)));
    let soon = SystemTime::now() + Duration::from_secs(5 * 86_400);
    write("soon", pki.issue(&pki.cert("soon").validity(SystemTime::now() - Duration::from_secs(60), soon)));
    std::fs::write(dir.path().join("ca.key"), pki.ca.key_pem()).unwrap();
    let listen = |name: &str| {
        Command::new(BIN)
            .arg("listen")
            .args(tls_args(dir.path(), name, "ca.crt"))
            .args(["--bind", "127.0.0.1:0", "--count", "0"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    fails_with(&listen("expired"), "expired.crt expired on");
    fails_with(&listen("clientonly"), "cannot accept sessions: its extended key usage lacks serverAuth");
    let out = send(dir.path(), "serveronly", "ca.crt", "127.0.0.1:9", "1", &["x"]);
    fails_with(&out, "cannot dial: its extended key usage lacks clientAuth");
    let out = Command::new(BIN)
        .arg("send")
        .args([
            "--cert",
            dir.path().join("ca.crt").to_str().unwrap(),
            "--key",
            dir.path().join("ca.key").to_str().unwrap(),
        ])
        .args(["--ca", dir.path().join("ca.crt").to_str().unwrap(), "--to", "127.0.0.1:9", "--name", "server", "x"])
        .output()
        .unwrap();
    fails_with(&out, "is a CA certificate: a node presents a node certificate");
    // Expiring soon: a warning on stderr by default, without colour codes (not a terminal).
    let (mut listener, addr) = {
        let mut child = Command::new(BIN)
            .arg("listen")
            .args(tls_args(dir.path(), "soon", "ca.crt"))
            .args(["--bind", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        (child, first)
    };
    assert!(addr.starts_with("listening on"), "{addr}");
    listener.kill().unwrap();
    let out = listener.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARN") && stderr.contains("this node's certificate expires soon subject=soon"),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "no ANSI colour codes when stderr is not a terminal: {stderr:?}");
}

#[test]
fn listen_reloads_its_crl_and_refuses_a_certificate_revoked_after_it_started() {
    use quicseal::pki::Revoked;
    use std::time::SystemTime;
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server", "client"]);
    let crl = |revoked: &[Revoked], number: u64| {
        let now = SystemTime::now();
        let pem =
            pki.ca.crl(revoked, number, now - Duration::from_secs(60), now + Duration::from_secs(86_400)).unwrap();
        // Written beside and renamed, as `cert crl` does, so the watcher never reads half a file.
        std::fs::write(dir.path().join("ca.crl.tmp"), pem).unwrap();
        std::fs::rename(dir.path().join("ca.crl.tmp"), dir.path().join("ca.crl")).unwrap();
    };
    crl(&[], 1);
    let crl_path = dir.path().join("ca.crl");
    let (mut listener, addr) = start_listener(dir.path(), &["--crl", crl_path.to_str().unwrap()]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["before"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let client = quicseal::load_certificates(dir.path().join("client.crt")).unwrap();
    let serial = x509_parser::parse_x509_certificate(&client[0]).unwrap().1.raw_serial().to_vec();
    crl(&[Revoked { serial, revoked_at: SystemTime::now(), reason: None }], 2);
    // The watcher checks every 5 s: within 30 s the listener refuses the client (exit 2).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["after"]);
        if out.status.code() == Some(2) {
            break out;
        }
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(std::time::Instant::now() < deadline, "the listener never reloaded its CRL");
    };
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("CertificateRevoked"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    listener.kill().unwrap();
    let _ = listener.wait();
}

#[test]
fn listen_serves_prometheus_metrics_after_traffic() {
    use std::io::{Read, Write};
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server", "client"]);
    let mut child = Command::new(BIN)
        .arg("listen")
        .args(tls_args(dir.path(), "server", "ca.crt"))
        .args(["--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next().unwrap().unwrap().strip_prefix("listening on ").unwrap().to_owned();
    let metrics = lines.next().unwrap().unwrap();
    let metrics =
        metrics.strip_prefix("metrics on http://").and_then(|m| m.strip_suffix("/metrics")).unwrap().to_owned();
    for text in ["one", "two"] {
        let out = send(dir.path(), "client", "ca.crt", &addr, "5", &[text]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut stream = std::net::TcpStream::connect(&metrics).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200 OK") && response.contains("text/plain; version=0.0.4"), "{response}");
    assert!(response.contains("quicseal_messages_delivered_total 2"), "{response}");
    assert!(response.contains("quicseal_tag_failures_total 0"), "{response}");
    assert!(response.contains("quicseal_open_connections"), "{response}");
}

#[test]
fn completions_and_the_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("listen"), "{shell}");
    }
    let out = run(&["man"]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && page.contains(".TH quicseal 1") && page.contains("completions"), "{page}");
    fails_with(&run(&["completions", "tcsh"]), "invalid value 'tcsh'");
    // Help is not an error; an unknown argument is bad input (exit 1).
    assert_eq!(run(&["--help"]).status.code(), Some(0));
    let help = run(&["send", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit codes: 0 the listener's application took"));
    fails_with(&run(&["send", "--bogus"]), "unexpected argument");
}

/// `listen --allow` takes what the library's policy does: names, SPIFFE trust domains and key
/// fingerprints.
#[test]
fn listen_allows_by_name_trust_domain_and_key() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["server"]);
    let client = pki.issue(&pki.cert("client").uri("spiffe://example.org/node/client"));
    std::fs::write(dir.path().join("client.crt"), &client.chain_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), &client.key_pem).unwrap();
    let fingerprint = to_identity(&client).fingerprint().to_string();
    let key_rule = format!("key:{fingerprint}");
    for (allow, code) in [
        ("spiffe://example.org", 0),
        ("spiffe://other.org", 3),
        (key_rule.as_str(), 0),
        ("key:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", 3),
        ("spiffe://example.org/node/client", 0),
        ("client", 0),
    ] {
        let (mut listener, addr) = start_listener(dir.path(), &["--allow", allow]);
        let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["hi"]);
        assert_eq!(out.status.code(), Some(code), "--allow {allow}: {}", String::from_utf8_lossy(&out.stderr));
        listener.kill().unwrap();
        let _ = listener.wait();
    }
    let bad = Command::new(BIN)
        .arg("listen")
        .args(tls_args(dir.path(), "server", "ca.crt"))
        .args(["--bind", "127.0.0.1:0", "--allow", "key:nothex"])
        .output()
        .unwrap();
    fails_with(&bad, "--allow key:nothex: not a key fingerprint");
}

/// A RUST_LOG the filter cannot read is said, not silently dropped.
#[test]
fn an_unreadable_rust_log_is_a_warning() {
    let out = Command::new(BIN).args(["man"]).env("RUST_LOG", "quicseal=loud").output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: RUST_LOG=\"quicseal=loud\" ignored"), "{stderr}");
    let out = Command::new(BIN).args(["man"]).env("RUST_LOG", "quicseal=debug").output().unwrap();
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `send --name spiffe://...` dials a listener whose certificate is an X.509-SVID (a URI SAN,
/// no DNS name), and refuses one that is not the SVID named.
#[test]
fn send_dials_a_listener_by_its_spiffe_id() {
    let pki = Pki::new("ca");
    let dir = pki_dir(&pki, &["client"]);
    let id = "spiffe://example.org/ns/default/sa/server";
    let issued = pki.issue(&quicseal::pki::NodeCert::new("server").uri(id));
    std::fs::write(dir.path().join("server.crt"), issued.chain_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), issued.key_pem).unwrap();
    let (listener, addr) = start_listener(dir.path(), &["--count", "1"]);
    let send_to = |name: &str| {
        Command::new(BIN)
            .arg("send")
            .args(tls_args(dir.path(), "client", "ca.crt"))
            .args(["--to", &addr, "--name", name, "--timeout", "5", "by SPIFFE ID"])
            .output()
            .unwrap()
    };
    let out = send_to("spiffe://example.org/ns/default/sa/other");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not an X.509-SVID for spiffe://example.org/ns/default/sa/other"), "{stderr}");
    let out = send_to(id);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listened = wait_with_deadline(listener);
    assert!(String::from_utf8_lossy(&listened.stdout).contains("by SPIFFE ID"));
}

/// `--bundle DOMAIN=FILE`: a listener trusts a federated trust domain's SVIDs through its
/// bundle alone (its `--ca` is another CA), and refuses them without it.
#[test]
fn listen_takes_a_spiffe_trust_bundle() {
    let (a, b) = (Pki::new("a CA"), Pki::new("b.test CA"));
    let dir = pki_dir(&a, &["server"]);
    std::fs::write(dir.path().join("b-ca.crt"), b.ca.cert_pem()).unwrap();
    let client = b.issue(&quicseal::pki::NodeCert::new("client").uri("spiffe://b.test/client"));
    std::fs::write(dir.path().join("client.crt"), client.chain_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), client.key_pem).unwrap();
    let bundle = format!("b.test={}", dir.path().join("b-ca.crt").display());

    let (listener, addr) = start_listener(dir.path(), &["--bundle", &bundle, "--count", "1"]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["from b.test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listened = wait_with_deadline(listener);
    assert!(String::from_utf8_lossy(&listened.stdout).contains("from b.test"));

    let (_listener, addr) = start_listener(dir.path(), &[]);
    let out = send(dir.path(), "client", "ca.crt", &addr, "5", &["refused"]);
    assert_eq!(out.status.code(), Some(2), "without the bundle: {}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(BIN)
        .arg("listen")
        .args(tls_args(dir.path(), "server", "ca.crt"))
        .args(["--bundle", "b.test", "--bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give DOMAIN=FILE"));
}

/// `listen --workload-api ENDPOINT` and `send --workload-api` (the endpoint from
/// SPIFFE_ENDPOINT_SOCKET) take their SVIDs and bundles from in-test Workload API agents; the
/// listener follows a rotation of its SVID, and a clear error names what is missing when no
/// endpoint is given.
#[test]
fn listen_and_send_take_their_svids_from_the_workload_api() {
    use crate::workload_api::{Agent, response};
    use quicseal::pki::NodeCert;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("example.org CA");
    let (server_id, client_id) = ("spiffe://example.org/server", "spiffe://example.org/client");
    let svid = |id: &str| pki.issue(&NodeCert::new("svid").uri(id));
    let first = svid(server_id);
    let (server_agent, client_agent) = rt.block_on(async {
        let server = Agent::start(dir.path(), "server", Some(response(server_id, &first, &[&pki], &[])));
        let client = Agent::start(dir.path(), "client", Some(response(client_id, &svid(client_id), &[&pki], &[])));
        (server, client)
    });
    let (listener, addr) = start_listener_with(&[
        "--workload-api".into(),
        server_agent.endpoint.clone(),
        "--count".into(),
        "2".into(),
        "--json".into(),
    ]);
    let send = |message: &str, endpoint: Option<&str>| {
        let mut command = Command::new(BIN);
        command.args(["send", "--workload-api", "--to", &addr, "--name", server_id, "--timeout", "10", message]);
        match endpoint {
            Some(endpoint) => command.env("SPIFFE_ENDPOINT_SOCKET", endpoint),
            None => command.env_remove("SPIFFE_ENDPOINT_SOCKET"),
        };
        command.output().unwrap()
    };
    let out = send("first", Some(&client_agent.endpoint));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The agent rotates the listener's SVID: new handshakes get the new one.
    let next = svid(server_id);
    server_agent.serve(Some(response(server_id, &next, &[&pki], &[])));
    let _in_runtime = rt.enter();
    let dialler = bind(quicseal::NodeConfig::new(to_identity(&svid(client_id)), pki.trust()));
    let addr_parsed: std::net::SocketAddr = addr.parse().unwrap();
    let want = to_identity(&next).fingerprint();
    rt.block_on(async {
        let presented = async || dialler.connect(addr_parsed, server_id).await.unwrap().peer().fingerprint;
        let checked = tokio::time::timeout(Duration::from_secs(20), async {
            while presented().await != want {
                tokio::time::sleep(Duration::from_millis(20)).await; // a condition wait's poll interval
            }
        });
        checked.await.expect("the listener took the rotated SVID");
    });
    let out = send("second", Some(&client_agent.endpoint));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listened = wait_with_deadline(listener);
    let stdout = String::from_utf8_lossy(&listened.stdout);
    assert!(stdout.contains("first") && stdout.contains("second"), "{stdout}");
    assert_eq!(stdout.matches(client_id).count(), 2, "{stdout}");

    // No endpoint given, none in the environment: exit 1, and the error says what to set.
    let out = send("nowhere", None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SPIFFE_ENDPOINT_SOCKET"));
    // Files and the Workload API at once: refused.
    let out = Command::new(BIN)
        .args(["listen", "--workload-api", &server_agent.endpoint, "--cert", "x.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
