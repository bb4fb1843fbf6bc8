//! Plain text only on purpose: every way of sending the operator API, the
//! agent API or etcd's credentials unencrypted is refused before anything
//! is opened or written, with what to do instead; and an operator's name
//! can never overwrite the PKI's own files.

use std::path::Path;
use std::process::{Command, Output};

use musubi_tests::bin;

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin(program));
    cmd.args(args).env_remove("MUSUBI_CONTROLLER").env_remove("MUSUBI_INSECURE").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run")
}

fn refused(out: &Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted; stderr: {stderr}");
    assert!(stderr.contains(says), "expected `{says}` in: {stderr}");
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn an_insecure_controller_stays_on_loopback_unless_asked_twice() {
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("file://{}", dir.path().display());
    let out = run("musubi-controller", &["serve", "--insecure", "--listen", "0.0.0.0:0", "--store", &store], &[]);
    refused(&out, "refusing plain text on 0.0.0.0:0");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-public"));
    assert_eq!(entries(dir.path()), 0, "no store was opened");
    // The second flag means nothing alone.
    let out =
        run("musubi-controller", &["serve", "--insecure-public", "--listen", "0.0.0.0:0", "--store", &store], &[]);
    refused(&out, "--insecure");
}

#[test]
fn etcd_credentials_never_cross_in_plain_text() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = dir.path().join("pki");
    let init = run("musubi-controller", &["init", "--pki", pki.to_str().expect("utf-8")], &[]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let pki = pki.to_str().expect("utf-8");
    // Port 1: nothing listens there; the refusal must come before any attempt.
    let serve = ["serve", "--pki", pki, "--listen", "127.0.0.1:0", "--store", "etcd://127.0.0.1:1"];
    let out = run(
        "musubi-controller",
        &[&serve[..], &["--etcd-user", "musubi"]].concat(),
        &[("MUSUBI_ETCD_PASSWORD", "s3cret")],
    );
    refused(&out, "etcd would receive the password in plain text");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cret"));
    let (cert, key) = (format!("{pki}/admin.pem"), format!("{pki}/admin-key.pem"));
    let out = run("musubi-controller", &[&serve[..], &["--etcd-client-cert", &cert, &key]].concat(), &[]);
    refused(&out, "an etcd client certificate needs the CA of the etcd servers");
}

#[test]
fn the_cli_and_the_agent_refuse_http_without_insecure() {
    let out = run("musubi", &["status", "--controller", "http://127.0.0.1:1"], &[]);
    refused(&out, "refusing plain text to http://127.0.0.1:1");
    let out = run("musubi", &["status", "--controller", "127.0.0.1:1"], &[]);
    refused(&out, "no operator certificate for https://127.0.0.1:1");
    // With --insecure it tries (and finds nobody there).
    let out = run("musubi", &["status", "--insecure", "--controller", "127.0.0.1:1"], &[]);
    refused(&out, "cannot reach the controller at http://127.0.0.1:1");

    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    let args = ["run", "--site", "x", "--datapath", "fake", "--controller", "https://127.0.0.1:1,http://127.0.0.1:2"];
    let out = run("musubi-agent", &[&args[..], &["--state", state.to_str().expect("utf-8")]].concat(), &[]);
    refused(&out, "refusing plain text to http://127.0.0.1:2");
    assert!(!state.exists() || entries(&state) == 0, "nothing written to the state directory");
}

#[test]
fn an_operator_cannot_be_named_after_the_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = dir.path().join("pki");
    let p = pki.to_str().expect("utf-8");
    assert!(run("musubi-controller", &["init", "--pki", p], &[]).status.success());
    let ca = std::fs::read(pki.join("ca.pem")).expect("ca");
    let ca_key = std::fs::read(pki.join("ca-key.pem")).expect("ca key");
    let files = entries(&pki);
    for name in ["ca", "server", "admin-key", "../outside", "a/b"] {
        let out = run("musubi-controller", &["operator", name, "--pki", p], &[]);
        refused(&out, "cannot name an operator");
    }
    assert_eq!(std::fs::read(pki.join("ca.pem")).expect("ca"), ca, "the CA is untouched");
    assert_eq!(std::fs::read(pki.join("ca-key.pem")).expect("ca key"), ca_key);
    assert_eq!(entries(&pki), files, "nothing written");
    assert!(!dir.path().join("outside.pem").exists());
    let out = run("musubi-controller", &["operator", "noc-east", "--pki", p], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
