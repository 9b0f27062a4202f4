//! The examples as processes, the way the README runs them: `gen_certs`, then `echo_server`
//! and `echo_client` (the README's library example), with certificates in a temp dir.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

/// An example's binary, next to this test binary (`target/<profile>/examples/`). `cargo test`
/// builds the examples before it runs the tests; a run of `cargo test --test it` does not, and
/// a binary older than any source file cargo built it from (its `.d` file lists them) would
/// test old code, so it is refused.
pub(crate) fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(|deps| deps.parent()).unwrap().join("examples").join(name);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
    let sources = std::fs::read_to_string(path.with_extension("d")).unwrap_or_default();
    let newest = sources
        .split_once(": ")
        .map(|(_, deps)| deps.split_whitespace().map(|d| modified(Path::new(d))).max().unwrap_or(UNIX_EPOCH));
    assert!(
        newest.is_some_and(|newest| modified(&path) >= newest),
        "{} is missing or older than its sources: run `cargo test` (it builds the examples) or `cargo build --examples`",
        path.display()
    );
    path
}

#[test]
fn gen_certs_echo_server_and_echo_client_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(example("gen_certs")).env("QUICSEAL_EXAMPLE_CERTS", &certs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"] {
        let mode = std::fs::metadata(certs.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, if f.ends_with(".key") { 0o600 } else { 0o644 }, "{f}");
    }
    // A second run refuses to replace them.
    let again = Command::new(example("gen_certs")).env("QUICSEAL_EXAMPLE_CERTS", &certs).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let mut server = Command::new(example("echo_server"))
        .arg("127.0.0.1:0")
        .env("QUICSEAL_EXAMPLE_CERTS", &certs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
    let addr = first.trim().strip_prefix("echo server on ").unwrap_or_else(|| panic!("{first:?}")).to_owned();

    let client = Command::new(example("echo_client"))
        .args(["hello there", &addr])
        .env("QUICSEAL_EXAMPLE_CERTS", &certs)
        .output()
        .unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    let stdout = String::from_utf8_lossy(&client.stdout);
    assert!(client.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&client.stderr));
    assert!(stdout.contains("talking to server"), "{stdout}");
    assert!(stdout.contains("says \"hello there\""), "{stdout}");
    assert!(stdout.contains("messages_sent=1"), "{stdout}");
}
