//! The Linux datapath in network namespaces (root only): an access point and
//! two sites built by `musubi-agent apply` from compiled configurations —
//! userspace WireGuard (wireguard-go) over an IPv4 and an IPv6 underlay,
//! table mode, the nftables policy — with LAN hosts behind the sites.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use musubi_agent::state::StateDir;
use musubi_tests::netns::{Net, skip_without_root};
use musubi_tests::{bin, eventually, reconcile_line, scaled};

const INTENT: &str = "tests/intents/datapath.yaml";
/// Payload of the test's pings: more than any neighbour discovery or MLD
/// packet a host receives unasked.
const PING_SIZE: u64 = 1200;

/// The WireGuard and domain modes the agents are asked for
/// (`MUSUBI_WIREGUARD`, `MUSUBI_DOMAINS`), as this host's `auto` picks them
/// when unset: wireguard-go and table mode here.
fn modes() -> (String, String) {
    let pick = |var: &str, auto: &str| std::env::var(var).ok().filter(|v| v != "auto").unwrap_or_else(|| auto.into());
    (pick("MUSUBI_WIREGUARD", "userspace"), pick("MUSUBI_DOMAINS", "table"))
}

fn intent_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(INTENT)
}

/// (router, segments it carries).
const ROUTERS: [(&str, &str, &[&str]); 3] = [
    ("ap", "ap-east", &["alpha", "beta", "gamma"]),
    ("s1", "site-1", &["alpha", "beta"]),
    ("s2", "site-2", &["alpha", "beta", "gamma"]),
];

/// (host, router, router's interface, router address, host address, IPv6 router/host).
type HostSpec =
    (&'static str, &'static str, &'static str, &'static str, &'static str, Option<(&'static str, &'static str)>);
const HOSTS: [HostSpec; 5] = [
    ("h1a", "s1", "lan-a", "10.10.1.1/24", "10.10.1.10/24", Some(("fd10:10:0:1::1/64", "fd10:10:0:1::10/64"))),
    ("h1b", "s1", "lan-b", "10.10.1.1/24", "10.10.1.10/24", None),
    ("h2a", "s2", "lan-a", "10.10.2.1/24", "10.10.2.10/24", Some(("fd10:10:0:2::1/64", "fd10:10:0:2::10/64"))),
    ("h2b", "s2", "lan-b", "10.10.2.1/24", "10.10.2.10/24", None),
    ("h2g", "s2", "lan-g", "10.30.2.1/24", "10.30.2.10/24", None),
];

struct Lab {
    net: Net,
    states: BTreeMap<&'static str, PathBuf>,
    keys: PathBuf,
}

impl Lab {
    fn up() -> Lab {
        let mut net = Net::new("mdp");
        net.host("wan");
        net.ok("wan", "ip link add br0 type bridge && ip link set br0 up");
        let underlay =
            [("ap", "192.0.2.1/24", "2001:db8::1/64"), ("s1", "192.0.2.11/24", ""), ("s2", "", "2001:db8::12/64")];
        for (router, v4, v6) in underlay {
            net.router(router);
            net.link(router, "u0", "wan", &format!("p-{router}"));
            net.ok("wan", &format!("ip link set p-{router} master br0"));
            if !v4.is_empty() {
                net.ok(router, &format!("ip addr add {v4} dev u0"));
            }
            if !v6.is_empty() {
                net.ok(router, &format!("ip addr add {v6} dev u0 nodad"));
            }
        }
        for (host, router, lan, raddr, haddr, v6) in HOSTS {
            net.host(host);
            net.link(router, lan, host, "eth0");
            let gw = raddr.split('/').next().unwrap_or_default();
            net.ok(router, &format!("ip addr add {raddr} dev {lan}"));
            net.ok(host, &format!("ip addr add {haddr} dev eth0 && ip route add default via {gw}"));
            if let Some((r6, h6)) = v6 {
                let gw6 = r6.split('/').next().unwrap_or_default();
                net.ok(router, &format!("ip addr add {r6} dev {lan} nodad"));
                net.ok(host, &format!("ip addr add {h6} dev eth0 nodad && ip -6 route add default via {gw6}"));
            }
        }
        // Each router's keys, made where they live; only public keys leave.
        let mut states = BTreeMap::new();
        let mut keys = String::new();
        for (router, site, segments) in ROUTERS {
            let state = net.dir().join(format!("state-{router}"));
            let dir = StateDir::new(&state);
            keys.push_str(&format!("{site}:\n"));
            for seg in segments {
                let (public, _) = dir.ensure_key(seg).expect("key");
                keys.push_str(&format!("  {seg}: \"{public}\"\n"));
            }
            states.insert(router, state);
        }
        let keys_file = net.dir().join("keys.yaml");
        std::fs::write(&keys_file, keys).expect("keys");
        Lab { net, states, keys: keys_file }
    }

    /// Compiles `site`'s configuration from `intent` into a JSON file.
    fn compile(&self, intent: &Path, site: &str) -> PathBuf {
        let out = Command::new(bin("musubi"))
            .args(["compile", "--format", "json", "--site", site, "--keys"])
            .arg(&self.keys)
            .arg(intent)
            .output()
            .expect("musubi compile");
        assert!(out.status.success(), "compile {site}: {}", String::from_utf8_lossy(&out.stderr));
        let file = self.net.dir().join(format!("{site}-{}.json", std::process::id()));
        std::fs::write(&file, &out.stdout).expect("config");
        file
    }

    /// `musubi-agent apply` in `router`: (operations, writes).
    fn apply(&self, router: &str, config: &Path) -> (u64, u64) {
        self.apply_in(router, config, &modes().1)
    }

    /// `musubi-agent apply` in `router` with its segments in `domains`
    /// (`vrf` or `table`).
    fn apply_in(&self, router: &str, config: &Path, domains: &str) -> (u64, u64) {
        let mut cmd = self.net.command(router, &bin("musubi-agent"));
        cmd.env("MUSUBI_DOMAINS", domains)
            .arg("apply")
            .arg("--config")
            .arg(config)
            .arg("--state")
            .arg(&self.states[router]);
        let out = cmd.output().expect("musubi-agent apply");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "apply in {router}: {text}{}", String::from_utf8_lossy(&out.stderr));
        let (ops, writes, _) = text.lines().find_map(reconcile_line).expect("a reconcile line");
        (ops, writes)
    }

    fn apply_all(&self, intent: &Path) -> Vec<(u64, u64)> {
        ROUTERS.iter().map(|(router, site, _)| self.apply(router, &self.compile(intent, site))).collect()
    }

    fn ping(&self, host: &str, target: &str) -> bool {
        // Large echo requests, to tell them from the hosts' own small chatter.
        self.net.sh(host, &format!("ping -c 2 -i 0.2 -W 2 -s {PING_SIZE} {target}")).status.success()
    }

    fn rx_bytes(&self, host: &str) -> u64 {
        // /proc/net is the reader's network namespace (/sys would be the host's).
        let dev = self.net.ok(host, "cat /proc/net/dev");
        let line = dev.lines().find(|l| l.trim_start().starts_with("eth0:")).expect("eth0");
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("rx bytes")
    }

    fn dropped_at(&self, router: &str) -> u64 {
        let text = self.net.ok(router, "nft -j list table inet musubi");
        let value: serde_json::Value = serde_json::from_str(&text).expect("nft json");
        musubi_agent::datapath::linux::nft::dropped(&value)
    }

    fn ifindex(&self, router: &str, name: &str) -> String {
        let text = self.net.ok(router, &format!("ip -o link show {name}"));
        text.split(':').next().unwrap_or_default().trim().to_string()
    }
}

/// Warms a path up (the first packets wait for WireGuard handshakes).
fn reaches(lab: &Lab, host: &str, target: &str) -> bool {
    eventually(Duration::from_secs(10), || lab.ping(host, target))
}

/// The lab with every router's configuration applied, and the operations
/// and writes of each; `None` (the test is skipped, loudly) without root.
fn built() -> Option<(Lab, Vec<(u64, u64)>)> {
    if skip_without_root() {
        return None;
    }
    let lab = Lab::up();
    let applied = lab.apply_all(&intent_path());
    Some((lab, applied))
}

#[test]
fn segments_reach_within_and_not_across_and_reconcile_is_idempotent() {
    let Some((lab, applied)) = built() else { return };
    let intent = intent_path();
    for (i, (ops, writes)) in applied.into_iter().enumerate() {
        assert!(ops > 0 && writes >= ops, "router {i}: {ops} operations, {writes} writes");
    }
    // The modes asked for (the kernel lab runs these tests with kernel
    // WireGuard and VRFs), else what this host has: wireguard-go, tables.
    let (wg, domains) = modes();
    for (router, _, _) in ROUTERS {
        let doctor = lab.net.ok(router, &format!("{} doctor", bin("musubi-agent").display()));
        let mode = doctor.lines().find(|l| l.starts_with("mode:")).unwrap_or_default();
        let wg_word = if wg == "kernel" { "kernel WireGuard" } else { "userspace (wireguard-go)" };
        let domain_words = if domains == "vrf" { "one VRF per segment" } else { "table mode" };
        assert!(mode.contains(wg_word) && mode.contains(domain_words), "{doctor}");
    }

    // Within a segment, across the access point (site 2 over IPv6).
    let (a0, b0) = (lab.rx_bytes("h2a"), lab.rx_bytes("h2b"));
    assert!(reaches(&lab, "h1a", "10.10.2.10"), "alpha: site 1 → site 2");
    let (a1, b1) = (lab.rx_bytes("h2a"), lab.rx_bytes("h2b"));
    assert!(
        a1 - a0 >= PING_SIZE && b1 - b0 < PING_SIZE,
        "alpha's ping reached alpha's host only (bytes: h2a {a0}→{a1}, h2b {b0}→{b1})"
    );
    assert!(reaches(&lab, "h1b", "10.10.2.10"), "beta, same addresses: site 1 → site 2");
    let (a2, b2) = (lab.rx_bytes("h2a"), lab.rx_bytes("h2b"));
    assert!(
        b2 - b1 >= PING_SIZE && a2 - a1 < PING_SIZE,
        "beta's ping reached beta's host only (bytes: h2a {a1}→{a2}, h2b {b1}→{b2})"
    );
    assert!(reaches(&lab, "h1a", "fd10:10:0:2::10"), "alpha over IPv6");

    // Across segments: gamma allows alpha SSH only; beta has no way at all.
    let dropped = lab.dropped_at("ap");
    assert!(!lab.ping("h1a", "10.30.2.10"), "alpha → gamma ICMP must not pass");
    let dropped_after = lab.dropped_at("ap");
    assert!(dropped_after >= dropped + 2, "the access point counted the drops ({dropped} → {dropped_after})");
    assert!(!lab.ping("h1b", "10.30.2.10"), "beta → gamma must not pass");
    let mut server = lab.net.command("h2g", Path::new("python3"));
    server
        .args(["-c", "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',22));s.listen();s.settimeout(10);print('ready',flush=True);c,_=s.accept();c.sendall(b'ok')"])
        .stdout(Stdio::piped());
    let mut server = server.spawn().expect("listener");
    // The client connects once the listener listens.
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().expect("stdout")), &mut line);
    assert_eq!(line.trim(), "ready", "the listener started");
    let client = lab.net.sh(
        "h1a",
        "python3 -c \"import socket;c=socket.create_connection(('10.30.2.10',22),timeout=5);print(c.recv(2).decode())\"",
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(String::from_utf8_lossy(&client.stdout).trim(), "ok", "the policy lets alpha's SSH into gamma");

    // Foreign objects survive; a second apply writes nothing.
    lab.net.ok(
        "s1",
        "ip route add 198.51.100.0/24 via 192.0.2.1 && ip rule add priority 300 from 203.0.113.0/24 lookup main",
    );
    for (i, (ops, writes)) in lab.apply_all(&intent).into_iter().enumerate() {
        assert_eq!((ops, writes), (0, 0), "router {i}: a second apply changes nothing");
    }
    assert!(lab.net.ok("s1", "ip route show 198.51.100.0/24").contains("via 192.0.2.1"), "foreign route kept");
    assert!(lab.net.ok("s1", "ip rule show priority 300").contains("203.0.113.0/24"), "foreign rule kept");

    // Half-applied state (as a crash would leave it) converges: the LAN out
    // of its segment (a rule gone in table mode, out of the VRF in VRF
    // mode) and a route gone.
    let unbind = if modes().1 == "vrf" { "ip link set lan-b nomaster" } else { "ip rule del priority 5200 iif lan-b" };
    lab.net.ok("s1", &format!("{unbind} && ip route del 10.10.0.0/16 table 1000"));
    let s1 = lab.compile(&intent, "site-1");
    let (ops, _) = lab.apply("s1", &s1);
    assert!(ops >= 2, "the missing binding and route are put back ({ops} operations)");
    assert_eq!(lab.apply("s1", &s1), (0, 0));
    assert!(reaches(&lab, "h1b", "10.10.2.10"), "beta works again");

    // Held: a reconcile loop (which keeps its observation while the kernel
    // raises no notification) puts back what is removed behind its back,
    // the policy table included.
    let mut hold = lab.net.command("s1", &bin("musubi-agent"));
    hold.args(["apply", "--repeat", "100", "--every", "100", "--config"])
        .arg(&s1)
        .arg("--state")
        .arg(&lab.states["s1"])
        .stdout(Stdio::null());
    let hold = musubi_tests::Reaped(hold.spawn().expect("apply --repeat"));
    std::thread::sleep(Duration::from_millis(700));
    lab.net.ok("s1", "ip route del 10.10.0.0/16 table 1000 && nft delete table inet musubi");
    let restored = eventually(scaled(Duration::from_secs(3)), || {
        lab.net
            .sh("s1", "ip route show table 1000 10.10.0.0/16 | grep -q me-alpha && nft list table inet musubi")
            .status
            .success()
    });
    drop(hold);
    assert!(restored, "the held configuration was put back within {:?}", scaled(Duration::from_secs(3)));

    // Remove beta from site 1: all of its objects go, the rest stays.
    let index = lab.ifindex("s1", "me-alpha");
    let text = std::fs::read_to_string(&intent).expect("intent");
    let without = text.replacen("  - segment: beta\n    interface: lan-b\n    prefixes: [10.10.1.0/24]\n", "", 1);
    assert_ne!(text, without);
    let smaller = lab.net.dir().join("without-beta.yaml");
    std::fs::write(&smaller, without).expect("intent");
    let (ops, _) = lab.apply("s1", &lab.compile(&smaller, "site-1"));
    assert!(ops > 0);
    let links = lab.net.ok("s1", "ip -o link show");
    assert!(!links.contains("me-beta") && !links.contains("mw-beta"), "beta's tunnels are gone: {links}");
    let rules = lab.net.ok("s1", "ip rule show; ip -6 rule show");
    assert!(
        !rules.contains("lan-b") && !rules.contains("me-beta") && !rules.contains("mw-beta"),
        "beta's rules are gone: {rules}"
    );
    assert_eq!(
        lab.net.ok("s1", "ip route show table 1001; ip -6 route show table 1001").trim(),
        "",
        "beta's table is empty"
    );
    assert!(!lab.net.ok("s1", "nft list table inet musubi").contains("lan-b"), "beta left the policy");
    assert_eq!(lab.ifindex("s1", "me-alpha"), index, "alpha's tunnel was not touched");
    assert!(reaches(&lab, "h1a", "10.10.2.10"), "alpha still works");
    assert!(!lab.ping("h1b", "10.10.2.10"), "beta no longer leaves site 1");

    let names: Vec<String> = ["wan", "ap", "s1", "s2"].iter().map(|n| lab.net.ns(n)).collect();
    let net = lab.net;
    drop(net);
    let left: Vec<String> = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// Waits for a line containing `needle` in a log file.
/// A kernel that gains VRFs (an upgrade, or `vrf.ko` installed): the agent
/// that built table mode is asked for VRF mode, converges in one apply and
/// leaves none of table mode's rules or tables behind. Runs where VRFs
/// exist (the kernel lab's guest, `MUSUBI_DOMAINS=vrf`).
#[test]
fn a_site_moving_from_table_mode_to_vrf_mode_converges_and_leaves_no_table_mode_rules() {
    if modes().1 != "vrf" {
        eprintln!("skipped: needs VRFs (MUSUBI_DOMAINS=vrf; the kernel lab runs it)");
        return;
    }
    if skip_without_root() {
        return;
    }
    let lab = Lab::up();
    let intent = intent_path();
    let configs: Vec<PathBuf> = ROUTERS.iter().map(|(_, site, _)| lab.compile(&intent, site)).collect();
    for ((router, _, _), config) in ROUTERS.iter().zip(&configs) {
        lab.apply_in(router, config, "table");
    }
    assert!(reaches(&lab, "h1a", "10.10.2.10"), "alpha works in table mode");
    let rules = "ip rule show priority 5200; ip -6 rule show priority 5200";
    let before = lab.net.ok("s1", rules);
    assert!(before.contains("lan-a") && before.contains("me-alpha"), "table mode's rules are there: {before}");

    let (ops, _) = lab.apply_in("s1", &configs[1], "vrf");
    assert!(ops > 0, "moving to VRF mode takes operations");
    assert_eq!(lab.net.ok("s1", rules).trim(), "", "no table-mode rule is left");
    let vrfs = lab.net.ok("s1", "ip -o link show type vrf");
    assert!(vrfs.contains("mv-alpha") && vrfs.contains("mv-beta"), "one VRF per segment: {vrfs}");
    let lan = lab.net.ok("s1", "ip -o link show lan-a");
    assert!(lan.contains("master mv-alpha"), "the LAN is in its VRF: {lan}");
    assert_eq!(lab.apply_in("s1", &configs[1], "vrf"), (0, 0), "converged: the next apply writes nothing");
    assert!(reaches(&lab, "h1a", "10.10.2.10"), "alpha works in VRF mode");
    assert!(reaches(&lab, "h1b", "10.10.2.10"), "beta works in VRF mode");
    let (a0, b0) = (lab.rx_bytes("h2a"), lab.rx_bytes("h2b"));
    assert!(lab.ping("h1b", "10.10.2.10"));
    let (a1, b1) = (lab.rx_bytes("h2a"), lab.rx_bytes("h2b"));
    assert!(
        b1 - b0 >= PING_SIZE && a1 - a0 < PING_SIZE,
        "beta's ping reached beta's host only, same addresses (bytes: h2a {a0}→{a1}, h2b {b0}→{b1})"
    );
}

fn wait_log(path: &Path, needle: &str, limit: Duration) -> bool {
    eventually(limit, || std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)))
}

#[test]
fn a_restarted_agent_adopts_its_tunnels_without_losing_a_packet() {
    let Some((lab, _)) = built() else { return };
    let intent = intent_path();
    assert!(reaches(&lab, "h1a", "10.10.2.10"));
    let index = lab.ifindex("s1", "me-alpha");

    // Site 1's agent starts headless from its last applied configuration
    // (no controller answers): it finds everything built and writes nothing.
    let config: musubi_proto::v1::SiteConfig =
        serde_json::from_slice(&std::fs::read(lab.compile(&intent, "site-1")).expect("config")).expect("json");
    let update = musubi_proto::v1::ConfigUpdate { revision: 1, digest: "d".into(), config: Some(config) };
    StateDir::new(&lab.states["s1"]).save_applied(&update).expect("applied.pb");
    let start = |n: usize| {
        let log = lab.net.dir().join(format!("agent-{n}.log"));
        let mut cmd = lab.net.command("s1", &bin("musubi-agent"));
        cmd.args(["run", "--datapath", "linux", "--site", "site-1", "--controller", "127.0.0.1:9", "--insecure"])
            .args(["--upkeep-s", "0.5"])
            .arg("--state")
            .arg(&lab.states["s1"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        (musubi_tests::Reaped(cmd.spawn().expect("agent")), log)
    };
    let (mut first, log) = start(1);
    assert!(wait_log(&log, "configuration applied", scaled(Duration::from_secs(10))), "first agent applied");
    assert!(
        std::fs::read_to_string(&log).expect("log").contains("writes=0"),
        "the first agent adopted, writing nothing"
    );

    // kill -9 during a steady ping (100 packets a second), then start again.
    let mut ping = lab.net.command("h1a", Path::new("ping"));
    ping.args(["-i", "0.01", "-c", "300", "-W", "1", "10.10.2.10"]).stdout(Stdio::piped());
    let ping = ping.spawn().expect("ping");
    std::thread::sleep(Duration::from_millis(700));
    first.0.kill().expect("kill -9");
    let _ = first.0.wait();
    let (second, log2) = start(2);
    assert!(wait_log(&log2, "configuration applied", scaled(Duration::from_secs(10))), "second agent applied");
    let out = ping.wait_with_output().expect("ping result");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("300 received"), "no packet lost across the restart: {}", text.lines().last().unwrap_or(""));
    assert!(std::fs::read_to_string(&log2).expect("log").contains("writes=0"), "the restarted agent wrote nothing");
    assert_eq!(lab.ifindex("s1", "me-alpha"), index, "same interface, no flap");

    // Supervision: alpha's wireguard-go dies (with kernel WireGuard: its
    // interface is deleted by hand); the agent, still headless, builds it
    // again and reconfigures it.
    if modes().0 == "kernel" {
        lab.net.ok("s1", "ip link del me-alpha");
    } else {
        let ns = lab.net.ns("s1");
        lab.net.ok(
            "wan",
            &format!(
                "for p in $(ip netns pids {ns}); do tr '\\0' ' ' < /proc/$p/cmdline | grep -q 'wireguard-go me-alpha' && kill -9 $p; done; true"
            ),
        );
    }
    assert!(wait_log(&log2, "put back", scaled(Duration::from_secs(10))), "the agent noticed and put the tunnel back");
    assert!(reaches(&lab, "h1a", "10.10.2.10"), "alpha works again");
    drop(second);
}

/// An access point with two lines, reached on its first line's address by a
/// member whose only line is on the subnet of its second line (through the
/// carrier's router): its answers must leave on the first line, from the
/// first line's address. Kernel WireGuard answers from the address it was
/// reached at only while the route from it leaves by the interface the
/// packet came in on; otherwise from the second line's address, which the
/// member's fence drops — found in the kernel lab, where the prefecture
/// lab's members on the wide-area Ethernet never brought a tunnel up.
#[test]
fn an_access_point_answers_a_member_on_the_line_it_was_reached_on() {
    if skip_without_root() {
        return;
    }
    let mut net = Net::new("mans");
    // Two carrier networks (bridges) and the router between them.
    for (bridge, _) in [("fib", ()), ("wae", ())] {
        net.host(bridge);
        net.ok(bridge, "ip link add br0 type bridge && ip link set br0 up");
    }
    net.router("carrier");
    net.router("ap");
    net.router("branch");
    net.host("h");
    for (node, port, bridge, address) in [
        ("carrier", "c0", "fib", "192.0.2.254/24"),
        ("carrier", "c1", "wae", "198.51.100.254/24"),
        ("ap", "u0", "fib", "192.0.2.1/24"),
        ("ap", "u1", "wae", "198.51.100.1/24"),
        ("branch", "u0", "wae", "198.51.100.22/24"),
    ] {
        let end = format!("p-{node}-{port}");
        net.link(node, port, bridge, &end);
        net.ok(bridge, &format!("ip link set {end} master br0"));
        net.ok(node, &format!("ip addr add {address} dev {port}"));
    }
    net.ok("carrier", "sysctl -qw net.ipv4.ip_forward=1");
    net.ok("ap", "ip route add default via 192.0.2.254 dev u0");
    net.ok("branch", "ip route add default via 198.51.100.254 dev u0");
    net.link("branch", "lan", "h", "eth0");
    net.ok("branch", "ip addr add 10.40.1.1/24 dev lan");
    net.ok("h", "ip addr add 10.40.1.10/24 dev eth0 && ip route add default via 10.40.1.1");

    let mut keys = String::new();
    let mut states = BTreeMap::new();
    for (router, site) in [("ap", "ap-east"), ("branch", "branch")] {
        let state = net.dir().join(format!("state-{router}"));
        let (public, _) = StateDir::new(&state).ensure_key("alpha").expect("key");
        keys.push_str(&format!("{site}:\n  alpha: \"{public}\"\n"));
        states.insert(router, state);
    }
    let keys_file = net.dir().join("keys.yaml");
    std::fs::write(&keys_file, keys).expect("keys");
    let intent = Path::new(env!("CARGO_MANIFEST_DIR")).join("intents/answers.yaml");
    let apply = |router: &str, site: &str| -> u64 {
        let out = Command::new(bin("musubi"))
            .args(["compile", "--format", "json", "--site", site, "--keys"])
            .arg(&keys_file)
            .arg(&intent)
            .output()
            .expect("musubi compile");
        assert!(out.status.success(), "compile {site}: {}", String::from_utf8_lossy(&out.stderr));
        let config = net.dir().join(format!("{site}.json"));
        std::fs::write(&config, &out.stdout).expect("config");
        let mut cmd = net.command(router, &bin("musubi-agent"));
        cmd.env("MUSUBI_DOMAINS", modes().1)
            .arg("apply")
            .arg("--config")
            .arg(&config)
            .arg("--state")
            .arg(&states[router]);
        let out = cmd.output().expect("musubi-agent apply");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "apply in {router}: {text}{}", String::from_utf8_lossy(&out.stderr));
        text.lines().find_map(reconcile_line).expect("a reconcile line").1
    };
    apply("ap", "ap-east");
    apply("branch", "branch");

    // From the first line's address, out of the first line through the
    // carrier; from the second's, out of the second, as the main table says.
    let first = net.ok("ap", "ip route get 198.51.100.22 from 192.0.2.1");
    assert!(first.contains("via 192.0.2.254 dev u0"), "answers from 192.0.2.1 leave: {first}");
    let second = net.ok("ap", "ip route get 198.51.100.22 from 198.51.100.1");
    assert!(second.contains("dev u1") && !second.contains("via"), "answers from 198.51.100.1 leave: {second}");
    let plain = net.ok("ap", "ip route get 198.51.100.22");
    assert!(plain.contains("dev u1"), "other packets to the member stay as the operator routes them: {plain}");
    assert_eq!(apply("ap", "ap-east"), 0, "the source pins are adopted as they are");

    // The branch's tunnel to ap-east (over the carrier to 192.0.2.1) comes up.
    let handshake = || {
        let _ = net.sh("h", "ping -c 1 -W 1 100.64.0.1");
        let out = net.sh("branch", "wg show me-alpha latest-handshakes");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace().nth(1).is_some_and(|t| t != "0")
    };
    assert!(
        eventually(scaled(Duration::from_secs(15)), handshake),
        "no handshake between the branch and ap-east: {}\n{}",
        net.ok("branch", "wg show all"),
        net.ok("ap", "wg show all; ip rule; ip route show table all | grep -v local")
    );
}
