//! The drill file: typed steps read by serde, so a mistake is reported with
//! its line and column and what was expected.
//!
//! ```yaml
//! name: east-ap-outage
//! streams: [{from: host-a, to: host-b, rate: 1000}]
//! steps:
//!   - wait: 1s
//!   - cut: {site: office-a, line: fiber}
//!   - flap: {site: office-a, line: fiber, down: 400ms, up: 1s, times: 3}
//!   - stop: ap-east          # also: partition: NODE
//!   - restore: ap-east       # also: restore: all, restore: {site: S, line: L}
//!   - expect: matrix
//! pass: {max_outage_ms: 1000, preferred: true, max_moves: {office-a: 4}}
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// A drill, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Drill {
    pub(super) name: String,
    #[serde(default)]
    pub(super) description: String,
    #[serde(default)]
    pub(super) streams: Vec<StreamSpec>,
    /// Each step is a one-key map (`wait: 1s`), not a YAML tag.
    #[serde(with = "yaml_serde::with::singleton_map_recursive")]
    pub(super) steps: Vec<Step>,
    #[serde(default)]
    pub(super) pass: Pass,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamSpec {
    pub(super) from: String,
    pub(super) to: String,
    /// Packets per second.
    #[serde(default = "default_rate")]
    pub(super) rate: u32,
    /// A TCP connection to this port of `to` instead of UDP packets (a port
    /// a policy lets through when the two hosts are in different
    /// segments): `rate` records of 16 bytes a second over it. TCP loses
    /// nothing, it stalls: its outage is its longest stall, and the drill
    /// fails if the connection breaks.
    #[serde(default)]
    pub(super) tcp: Option<u16>,
}

fn default_rate() -> u32 {
    1000
}

/// What the drill must show to pass.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Pass {
    /// The longest a flow may go without packets while a way exists.
    pub(super) max_outage_ms: u64,
    /// Traffic must end on every source site's preferred line and access point.
    pub(super) preferred: bool,
    /// At most this many times any one of a site's route groups or peer
    /// lines may move during the drill: hysteresis.
    pub(super) max_moves: BTreeMap<String, u64>,
}

impl Default for Pass {
    fn default() -> Self {
        Pass { max_outage_ms: 1000, preferred: true, max_moves: BTreeMap::new() }
    }
}

/// One step of the timeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum Step {
    Wait(#[serde(deserialize_with = "duration")] Duration),
    Cut(SiteLine),
    /// A black hole on one of a site's tunnels only (its lines stay up): a
    /// partial failure, or an interconnect cut.
    Block(SiteTunnel),
    Stop(String),
    Partition(String),
    Restore(Restore),
    Flap(Flap),
    Expect(Expectation),
    /// `musubi site rotate-keys SITE --wait`: the site's WireGuard keys
    /// rotated, make before break, while the streams run.
    #[serde(rename = "rotate-keys")]
    RotateKeys(String),
    /// `musubi site revoke-keys SITE`: the site's keys revoked (its peers
    /// drop them at once; it comes back with fresh ones).
    #[serde(rename = "revoke-keys")]
    RevokeKeys(String),
    /// `musubi apply --merge -f FILE --yes`, FILE beside the drill file: a
    /// change of intent (a cutover), one plan like any other.
    Apply(String),
    /// Starts a router's agent with a new one-time token (a site the
    /// intent has gained since `lab up`), and waits until it is in sync.
    Agent(String),
    /// A command in a node (`sh -c`), e.g. moving a gateway address.
    Exec(NodeCommand),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NodeCommand {
    pub(super) node: String,
    pub(super) command: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SiteLine {
    pub(super) site: String,
    pub(super) line: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SiteTunnel {
    pub(super) site: String,
    /// The tunnel's interface: `me-<segment>` / `mw-<segment>` (a site's
    /// to the east / west access point), `mm-<segment>` / `mi-<segment>` (an
    /// access point's to its members / the interconnect).
    pub(super) tunnel: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Flap {
    pub(super) site: String,
    pub(super) line: String,
    #[serde(deserialize_with = "duration")]
    pub(super) down: Duration,
    #[serde(deserialize_with = "duration")]
    pub(super) up: Duration,
    #[serde(deserialize_with = "times")]
    pub(super) times: u32,
}

/// `restore: all`, `restore: NODE` or `restore: {site: S, line: L}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Restore {
    All,
    Node(String),
    Line(SiteLine),
}

impl<'de> Deserialize<'de> for Restore {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "`all`, a node's name, or {site: S, line: L}")]
        enum Written {
            Name(String),
            Line(SiteLine),
        }
        Ok(match Written::deserialize(d)? {
            Written::Name(n) if n == "all" => Restore::All,
            Written::Name(n) => Restore::Node(n),
            Written::Line(l) => Restore::Line(l),
        })
    }
}

/// What an `expect` step checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Expectation {
    /// Every pair reaches, or does not reach, each other as the intent says.
    Matrix,
    /// How many packets of a segment some routers forward over a while
    /// (entering from the segment's tunnels or domain): `{forwarded:
    /// {sites: [nat-east, nat-west], segment: pref-lan, for: 2s, max: 0}}`
    /// — none of it crosses them — or `min: 1` — it does.
    Forwarded(Forwarded),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Forwarded {
    pub(super) sites: Vec<String>,
    pub(super) segment: String,
    /// How long to count (default 1 s).
    #[serde(rename = "for", default = "one_second", deserialize_with = "duration")]
    pub(super) window: Duration,
    /// At least this many packets in all (default 0).
    #[serde(default)]
    pub(super) min: u64,
    /// At most this many (default: no limit).
    #[serde(default)]
    pub(super) max: Option<u64>,
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

/// `2s`, `1.5s`, `500ms`, or a bare number of seconds; 0 to 1 h.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        return Err(format!("`{text}` has no unit (write `2s` or `500ms`)"));
    };
    let n: f64 = number.trim().parse().map_err(|_| format!("`{text}` is not a duration"))?;
    if !(0.0..=3600.0).contains(&(n * scale)) {
        return Err(format!("`{text}` is out of range (0 to 1 h)"));
    }
    Ok(Duration::from_secs_f64(n * scale))
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a duration such as `2s` or `500ms`")]
    enum Written {
        Seconds(f64),
        Text(String),
    }
    let text = match Written::deserialize(d)? {
        Written::Seconds(s) => format!("{s}s"),
        Written::Text(t) => t,
    };
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn times<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u64::deserialize(d)?;
    u32::try_from(n)
        .ok()
        .filter(|t| (1..=100).contains(t))
        .ok_or_else(|| serde::de::Error::custom("`times` must be 1 to 100"))
}

/// Reads a drill file; its names are checked against the lab later.
pub(super) fn read(path: &Path) -> Result<Drill> {
    let source = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&source).with_context(|| format!("{} is not a drill", path.display()))
}

fn parse(source: &str) -> Result<Drill> {
    let drill: Drill = yaml_serde::from_str(source)?;
    if drill.streams.iter().any(|s| !(1..=10_000).contains(&s.rate)) {
        bail!("a stream's rate must be 1 to 10000 packets/s");
    }
    if let Some(s) = drill.streams.iter().find(|s| s.tcp == Some(0)) {
        bail!("stream {} → {}: `tcp` is the port to connect to, 1 to 65535", s.from, s.to);
    }
    Ok(drill)
}

impl Drill {
    /// Multiplies the drill's times by `k`: its waits, its flaps' down and up
    /// times and the longest outage it allows (see `lab drill --time-scale`).
    pub(super) fn scale(&mut self, k: u32) {
        for step in &mut self.steps {
            match step {
                Step::Wait(d) => *d *= k,
                Step::Flap(f) => {
                    f.down *= k;
                    f.up *= k;
                }
                _ => {}
            }
        }
        self.pass.max_outage_ms *= u64::from(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scaled_drill_multiplies_its_times_and_nothing_else() {
        let yaml = "name: t\nstreams: [{from: a, to: b, rate: 1000}]\nsteps:\n- wait: 2s\n- cut: {site: s, line: l}\n\
                    - flap: {site: s, line: l, down: 400ms, up: 1s, times: 5}\npass: {max_outage_ms: 250}\n";
        let mut d = parse(yaml).expect("drill");
        d.scale(4);
        assert_eq!(d.steps[0], Step::Wait(Duration::from_secs(8)));
        assert_eq!(d.steps[1], Step::Cut(SiteLine { site: "s".into(), line: "l".into() }));
        let Step::Flap(f) = &d.steps[2] else { panic!("a flap: {:?}", d.steps[2]) };
        assert_eq!((f.down, f.up, f.times), (Duration::from_millis(1600), Duration::from_secs(4), 5));
        assert_eq!(d.pass.max_outage_ms, 1000);
        assert_eq!(d.streams[0].rate, 1000, "rates are not times");
    }

    fn steps(yaml: &str) -> Result<Vec<Step>> {
        Ok(parse(&format!("name: t\nsteps:\n{yaml}"))?.steps)
    }

    #[test]
    fn steps_read_as_written_and_mistakes_are_named_with_their_place() {
        let read = steps(
            "- wait: 1.5s\n- cut: {site: s, line: l}\n- stop: n\n- partition: controller\n- restore: all\n\
             - restore: n\n- restore: {site: s, line: l}\n- flap: {site: s, line: l, down: 400ms, up: 1s, times: 3}\n\
             - expect: matrix\n- wait: 2\n",
        )
        .expect("valid steps");
        let sl = SiteLine { site: "s".into(), line: "l".into() };
        assert_eq!(read[0], Step::Wait(Duration::from_millis(1500)));
        assert_eq!(read[1], Step::Cut(sl.clone()));
        assert_eq!(read[4], Step::Restore(Restore::All));
        assert_eq!(read[5], Step::Restore(Restore::Node("n".into())));
        assert_eq!(read[6], Step::Restore(Restore::Line(sl)));
        assert_eq!(
            read[7],
            Step::Flap(Flap {
                site: "s".into(),
                line: "l".into(),
                down: Duration::from_millis(400),
                up: Duration::from_secs(1),
                times: 3
            })
        );
        assert_eq!(read[8], Step::Expect(Expectation::Matrix));
        assert_eq!(read[9], Step::Wait(Duration::from_secs(2)));
        for (bad, says) in [
            ("- wait: 2\n- wait: 2 minutes\n", "`2 minutes` is not a duration"),
            ("- wait: 2h\n", "`2h` has no unit"),
            ("- cut: {site: s}\n", "missing field `line`"),
            ("- explode: now\n", "unknown variant `explode`"),
            ("- flap: {site: s, line: l, down: 1s, up: 1s, times: 0}\n", "`times` must be 1 to 100"),
            ("- expect: everything\n", "unknown variant `everything`, expected `matrix`"),
        ] {
            let e = format!("{:#}", steps(bad).expect_err(bad));
            assert!(e.contains(says), "{bad} → {e}");
            assert!(e.contains("line "), "{bad}: the error names no place: {e}");
        }
    }

    #[test]
    fn a_stream_rate_out_of_range_is_refused() {
        let e = parse("name: t\nstreams: [{from: a, to: b, rate: 0}]\nsteps: []\n").expect_err("rate 0");
        assert!(e.to_string().contains("rate must be 1 to 10000"), "{e}");
    }

    #[test]
    fn a_tcp_stream_names_its_port() {
        let d = parse("name: t\nstreams: [{from: a, to: b, rate: 200, tcp: 8080}, {from: b, to: a}]\nsteps: []\n")
            .expect("drill");
        assert_eq!((d.streams[0].tcp, d.streams[1].tcp), (Some(8080), None));
        let e = parse("name: t\nstreams: [{from: a, to: b, tcp: 0}]\nsteps: []\n").expect_err("port 0");
        assert!(e.to_string().contains("`tcp` is the port to connect to"), "{e}");
        let e = parse("name: t\nstreams: [{from: a, to: b, tcp: http}]\nsteps: []\n").expect_err("a name");
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
    }

    #[test]
    fn every_shipped_drill_reads() {
        let labs = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut read = 0;
        for lab in std::fs::read_dir(&labs).expect("labs") {
            let Ok(drills) = std::fs::read_dir(lab.expect("entry").path().join("drills")) else { continue };
            for f in drills {
                let path = f.expect("entry").path();
                let drill = super::read(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                assert!(!drill.steps.is_empty(), "{} has no steps", path.display());
                read += 1;
            }
        }
        assert!(read >= 5, "only {read} drills found under {}", labs.display());
    }
}
