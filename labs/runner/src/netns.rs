//! Network and mount namespaces, the one way Musubi builds them: for `musubi
//! lab` and for the tests that need real namespaces.
//!
//! A node is a network namespace (`ip netns add`); a router also gets a mount
//! namespace of its own, kept in a file, with a tmpfs on `/var/run/wireguard`
//! — wireguard-go's UAPI sockets live there and are otherwise shared by every
//! network namespace on the host. Nodes are joined by veth pairs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A namespace operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{command} could not be run")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `cmd`; its output when it succeeded.
pub fn run(cmd: &mut Command) -> Result<Output, NetnsError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| NetnsError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Failed { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(out)
}

/// `ip ARGS…`.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    run(Command::new("ip").args(args)).map(drop)
}

/// Whether this process may create namespaces.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Makes `dir` a private mount point, so the mount-namespace files kept in it
/// do not propagate to (and pin) other mount namespaces.
pub fn private_mounts(dir: &Path) -> Result<(), NetnsError> {
    std::fs::create_dir_all(dir).map_err(|source| NetnsError::Io { what: "creating", path: dir.into(), source })?;
    std::fs::create_dir_all("/var/run/wireguard").map_err(|source| NetnsError::Io {
        what: "creating",
        path: "/var/run/wireguard".into(),
        source,
    })?;
    run(Command::new("mount").arg("--bind").arg(dir).arg(dir))?;
    run(Command::new("mount").arg("--make-private").arg(dir)).map(drop)
}

/// `ip netns add NS` with its loopback up.
pub fn add(ns: &str) -> Result<(), NetnsError> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// A mount namespace kept in `file` with its own tmpfs on
/// `/var/run/wireguard`.
pub fn own_mounts(file: &Path) -> Result<(), NetnsError> {
    std::fs::write(file, b"").map_err(|source| NetnsError::Io { what: "creating", path: file.into(), source })?;
    run(Command::new("unshare").arg(format!("--mount={}", file.display())).args([
        "--propagation",
        "private",
        "mount",
        "-t",
        "tmpfs",
        "tmpfs",
        "/var/run/wireguard",
    ]))
    .map(drop)
}

/// A veth pair between `a_if` in `a` and `b_if` in `b`, both up.
pub fn veth(a: &str, a_if: &str, b: &str, b_if: &str) -> Result<(), NetnsError> {
    ip(&["link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b])?;
    ip(&["-n", a, "link", "set", a_if, "up"])?;
    ip(&["-n", b, "link", "set", b_if, "up"])
}

/// `program` run in network namespace `ns`, and in the mount namespace kept
/// in `mounts` when given.
pub fn command(ns: &str, mounts: Option<&Path>, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"));
    if let Some(m) = mounts {
        cmd.arg(format!("--mount={}", m.display()));
    }
    cmd.arg("--").arg(program);
    cmd
}

/// Every named network namespace.
pub fn list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what still runs in `ns` (wireguard-go, agents), then deletes it.
pub fn remove(ns: &str) -> Result<(), NetnsError> {
    let pids = Command::new("ip").args(["netns", "pids", ns]).output();
    for pid in pids.iter().flat_map(|o| {
        String::from_utf8_lossy(&o.stdout).into_owned().split_whitespace().map(String::from).collect::<Vec<_>>()
    }) {
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
    ip(&["netns", "del", ns])
}

/// `umount PATH`, quietly: what was not mounted is not an error here.
pub fn unmount(path: &Path) {
    let _ = Command::new("umount").arg(path).stderr(std::process::Stdio::null()).status();
}

/// `GET path` from `addr` inside network namespace `ns` (an agent's
/// loopback-only metrics): the response's body. A thread of its own enters
/// the namespace, so the caller's stays as it was. Bounded: 2 s to connect,
/// 5 s to read.
pub fn http_get(ns: &str, addr: std::net::SocketAddr, path: &str) -> Result<String, NetnsError> {
    use std::io::{Read as _, Write as _};
    use std::time::Duration;
    let file = PathBuf::from(format!("/run/netns/{ns}"));
    let io = |what, source| NetnsError::Io { what, path: file.clone(), source };
    let handle = std::fs::File::open(&file).map_err(|e| io("opening", e))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let fetched = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<String> {
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .join()
    });
    let response = fetched
        .map_err(|_| io("reading through", std::io::Error::other("the thread panicked")))?
        .map_err(|e| io("reading through", e))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response.as_str(), ""));
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|c| c != "200") {
        return Err(NetnsError::Failed {
            command: format!("GET http://{addr}{path} in {ns}"),
            stderr: head.lines().next().unwrap_or_default().to_string(),
        });
    }
    Ok(body.to_string())
}

/// The value of the sample `name` in Prometheus' text format: its name,
/// and its labels exactly as written (`x_total`, `x{a="b"}`).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

/// Forwards TCP connections to `listen` (a loopback address of this host)
/// to `to` inside network namespace `ns`, each on threads of its own, until
/// the process ends.
pub fn forward(listen: std::net::SocketAddr, ns: &str, to: std::net::SocketAddr) -> Result<(), NetnsError> {
    let file = PathBuf::from(format!("/run/netns/{ns}"));
    let io = |what, source| NetnsError::Io { what, path: file.clone(), source };
    if !listen.ip().is_loopback() {
        return Err(io("forwarding to", std::io::Error::other(format!("{listen} is not a loopback address"))));
    }
    let listener = std::net::TcpListener::bind(listen).map_err(|e| io("forwarding to", e))?;
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let file = file.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let handle = std::fs::File::open(&file)?;
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let server = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))?;
            let (mut c_in, mut s_out) = (client.try_clone()?, server.try_clone()?);
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            let _ = std::io::copy(&mut s_in, &mut c_out);
            let _ = c_out.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
            Ok(())
        });
    }
    Ok(())
}
