//! The agent's Prometheus metrics: its moves, builds and connection as
//! counters and gauges it updates, and each probed peer's and line path's
//! health, the route groups' active candidates and the lines in use read
//! from the agent's own state on every scrape.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::failover::Choices;
use crate::probe::{Health, Healths, Key};

/// The agent's metrics; clones share them.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Route groups moved to another candidate by a failover.
    pub group_moves: Counter,
    /// Peers' lines moved to another path by a failover.
    pub line_moves: Counter,
    /// Configurations received from a controller.
    pub configurations: Counter,
    /// How long each build of the datapath took.
    pub builds: Histogram,
    /// The revision of the configuration applied.
    pub revision: Gauge,
    /// 1 while a stream with a controller is open.
    pub connected: Gauge,
    live: Arc<Mutex<Live>>,
}

/// What the collector reads on a scrape.
#[derive(Debug, Default)]
struct Live {
    health: Option<Healths>,
    choices: Choices,
    writes: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            group_moves: Counter::default(),
            line_moves: Counter::default(),
            configurations: Counter::default(),
            // 1 ms to ~4 s.
            builds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 13)),
            revision: Gauge::default(),
            connected: Gauge::default(),
            live: Arc::default(),
        }
    }
}

impl Metrics {
    /// A registry with every metric of the agent (prefix `musubi_agent_`).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("musubi_agent");
        r.register(
            "route_group_moves",
            "Route groups moved to another candidate by a failover",
            self.group_moves.clone(),
        );
        r.register("line_moves", "Peers' lines moved to another path by a failover", self.line_moves.clone());
        r.register("configurations_received", "Configurations received from a controller", self.configurations.clone());
        r.register_with_unit(
            "datapath_build_duration",
            "How long each build of the datapath took",
            Unit::Seconds,
            self.builds.clone(),
        );
        r.register("applied_revision", "The revision of the configuration applied", self.revision.clone());
        r.register("controller_connected", "1 while a stream with a controller is open", self.connected.clone());
        r.register_collector(Box::new(LiveCollector(self.live.clone())));
        r
    }

    /// The probes' health, read on each scrape.
    pub fn watch_health(&self, health: Healths) {
        self.live().health = Some(health);
    }

    /// What the datapath holds after a build: the choices built and the
    /// writes made since start.
    pub fn built(&self, choices: &Choices, writes: u64, took: Duration) {
        self.builds.observe(took.as_secs_f64());
        let mut live = self.live();
        live.choices.clone_from(choices);
        live.writes = writes;
    }

    /// Counts the moves from `before` to `after`.
    pub fn moved(&self, before: &Choices, after: &Choices) {
        self.group_moves.inc_by(changed(&before.groups, &after.groups));
        self.line_moves.inc_by(changed(&before.paths, &after.paths));
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The keys of `b` whose value differs from `a`'s (a key new to `b` is
/// not a move).
fn changed<K: Ord, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> u64 {
    b.iter().filter(|(k, v)| a.get(*k).is_some_and(|w| w != *v)).count() as u64
}

#[derive(Debug)]
struct LiveCollector(Arc<Mutex<Live>>);

type Labels = Vec<(&'static str, String)>;

/// A target's labels and health.
type Row<'a> = (Labels, &'a Health);

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (health, choices, writes) = {
            let live = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let health: BTreeMap<Key, Health> =
                live.health.as_ref().map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default();
            (health, live.choices.clone(), live.writes)
        };
        let writes_counter = ConstCounter::new(writes);
        let e = encoder.encode_descriptor(
            "datapath_writes",
            "Writes to the datapath since the agent started",
            None,
            writes_counter.metric_type(),
        )?;
        writes_counter.encode(e)?;

        let (mut peers, mut paths): (Vec<Row<'_>>, Vec<Row<'_>>) = (Vec::new(), Vec::new());
        for (key, h) in &health {
            match key {
                Key::Tunnel { segment, peer } => {
                    peers.push((vec![("segment", segment.clone()), ("peer", peer.clone())], h));
                }
                Key::Path { local, remote } => {
                    paths.push((vec![("local", local.to_string()), ("remote", remote.to_string())], h));
                }
                Key::Heard { .. } => {}
            }
        }
        for (what, rows) in [("peer", &peers), ("path", &paths)] {
            let about = if what == "peer" { "a peer (through the segment's tunnel)" } else { "an underlay line path" };
            let (name, help) = (format!("{what}_up"), format!("1 while the probes to {about} are answered"));
            let mut e = encoder.encode_descriptor(&name, &help, None, ConstGauge::new(0_i64).metric_type())?;
            for (labels, h) in rows.iter() {
                ConstGauge::new(i64::from(h.up)).encode(e.encode_family(labels)?)?;
            }
            gauges(
                &mut encoder,
                &format!("{what}_rtt"),
                &format!("The probes' last round trip to {about}"),
                Some(Unit::Seconds),
                rows,
                |h| f64::from(h.rtt_us) / 1e6,
            )?;
            gauges(
                &mut encoder,
                &format!("{what}_loss_ratio"),
                &format!("The share of recent probes to {about} not answered"),
                None,
                rows,
                |h| f64::from(h.loss_permille) / 1000.0,
            )?;
        }
        let one = ConstGauge::new(1_i64);
        let mut e = encoder.encode_descriptor(
            "route_group_active",
            "1 for the candidate each route group's traffic goes to",
            None,
            one.metric_type(),
        )?;
        for ((segment, group), peer) in &choices.groups {
            let labels: Labels = vec![("segment", segment.clone()), ("group", group.clone()), ("peer", peer.clone())];
            ConstGauge::new(1_i64).encode(e.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "line_in_use",
            "1 for the pair of lines each peer's outer packets use",
            None,
            one.metric_type(),
        )?;
        for (peer, (local, remote)) in &choices.paths {
            let labels: Labels =
                vec![("peer", peer.clone()), ("local_line", local.clone()), ("remote_line", remote.clone())];
            ConstGauge::new(1_i64).encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// One gauge family: a sample per row.
fn gauges(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: &[Row<'_>],
    value: impl Fn(&Health) -> f64,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, unit.as_ref(), ConstGauge::new(0.0_f64).metric_type())?;
    for (labels, h) in rows {
        ConstGauge::new(value(h)).encode(e.encode_family(labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices(group: &str, line: &str) -> Choices {
        Choices {
            groups: BTreeMap::from([(("office".into(), "all".into()), group.into())]),
            paths: BTreeMap::from([("ap-east".into(), (line.into(), "fiber".into()))]),
        }
    }

    /// Moves count what changed, and what a scrape shows follows the
    /// builds: the active candidate, the line in use, each peer's health.
    #[test]
    fn a_scrape_shows_the_moves_the_paths_in_use_and_the_health() {
        let m = Metrics::default();
        let registry = m.registry();
        let (east, west) = (choices("ap-east", "fiber"), choices("ap-west", "lte"));
        m.moved(&east, &east);
        assert_eq!(m.group_moves.get(), 0, "nothing moved");
        m.moved(&east, &west);
        m.built(&west, 17, Duration::from_millis(3));
        let health: Healths = Arc::default();
        health.lock().expect("lock").insert(
            Key::tunnel("office", "ap-east"),
            Health {
                up: false,
                since: None,
                rtt_us: 1500,
                loss_permille: 250,
                last_reply: None,
                interval: Duration::ZERO,
                up_before: None,
            },
        );
        m.watch_health(health);
        let text = musubi_process::metrics::encode(&registry);
        for line in [
            "musubi_agent_route_group_moves_total 1",
            "musubi_agent_line_moves_total 1",
            "musubi_agent_datapath_writes_total 17",
            "musubi_agent_datapath_build_duration_seconds_count 1",
            "musubi_agent_route_group_active{segment=\"office\",group=\"all\",peer=\"ap-west\"} 1",
            "musubi_agent_line_in_use{peer=\"ap-east\",local_line=\"lte\",remote_line=\"fiber\"} 1",
            "musubi_agent_peer_up{segment=\"office\",peer=\"ap-east\"} 0",
            "musubi_agent_peer_rtt_seconds{segment=\"office\",peer=\"ap-east\"} 0.0015",
            "musubi_agent_peer_loss_ratio{segment=\"office\",peer=\"ap-east\"} 0.25",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        assert!(
            !text.lines().any(|l| l.starts_with("musubi_agent_route_group_active") && l.contains("ap-east")),
            "the old candidate is gone:\n{text}"
        );
    }
}
