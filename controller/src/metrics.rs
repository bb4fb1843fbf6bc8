//! The controller's Prometheus metrics (prefix `musubi_controller_`), one
//! set per process. No label names a site: at 10,000 sites a label per site
//! would be 10,000 series per metric; per-site detail stays in `musubi
//! status`. Labels are drawn from small fixed sets (an apply's outcome, a
//! store operation, a refusal's reason).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `applied`, `unchanged`, `dry_run`, `invalid`, `conflict`, `failed`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Operation {
    /// The store operation: `load`, `commit`, `history`, `list`, `swap`, …
    pub operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteState {
    /// As on the dashboard: `ok`, `degraded`, `down`, `offline`, `never`,
    /// `revoked`.
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why an agent was refused: `unknown_site`, `revoked`, `bad_token`,
    /// `wrong_site`, `no_hello`, `not_a_site`.
    pub reason: &'static str,
}

/// Every metric of the controller.
#[derive(Debug)]
pub struct Metrics {
    pub applies: Family<Outcome, Counter>,
    pub apply_duration: Histogram,
    pub follow_duration: Histogram,
    pub configurations_sent: Counter,
    pub configuration_bytes: Counter,
    pub store_duration: Family<Operation, Histogram>,
    pub sessions: Gauge,
    pub in_sync: Gauge,
    pub sites: Gauge,
    pub sites_by_state: Family<SiteState, Gauge>,
    pub enrolments: Counter,
    pub renewals: Counter,
    pub refusals: Family<Reason, Counter>,
    pub statuses_coalesced: Counter,
    registry: Arc<Registry>,
}

fn seconds() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let store_duration = Family::<Operation, Histogram>::new_with_constructor(seconds as fn() -> Histogram);
        let m = Metrics {
            applies: Family::default(),
            apply_duration: seconds(),
            follow_duration: seconds(),
            configurations_sent: Counter::default(),
            configuration_bytes: Counter::default(),
            store_duration,
            sessions: Gauge::default(),
            in_sync: Gauge::default(),
            sites: Gauge::default(),
            sites_by_state: Family::default(),
            enrolments: Counter::default(),
            renewals: Counter::default(),
            refusals: Family::default(),
            statuses_coalesced: Counter::default(),
            registry: Arc::default(),
        };
        let mut r = Registry::with_prefix("musubi_controller");
        r.register("applies", "Applies of intent, by outcome", m.applies.clone());
        r.register_with_unit("apply_duration", "How long an apply took", Unit::Seconds, m.apply_duration.clone());
        r.register_with_unit(
            "follow_duration",
            "How long the fan-out took to follow a new intent revision (recompile and publish)",
            Unit::Seconds,
            m.follow_duration.clone(),
        );
        r.register("configurations_sent", "Site configurations sent to agents", m.configurations_sent.clone());
        r.register_with_unit(
            "configurations_sent",
            "Bytes of the site configurations sent to agents",
            Unit::Bytes,
            m.configuration_bytes.clone(),
        );
        r.register_with_unit(
            "store_operation_duration",
            "How long an operation on the intent store took, by operation",
            Unit::Seconds,
            m.store_duration.clone(),
        );
        r.register("agent_sessions", "Agent streams open on this controller", m.sessions.clone());
        r.register(
            "agents_in_sync",
            "Agents with a stream open on this controller whose last status reports the configuration it should have",
            m.in_sync.clone(),
        );
        r.register("sites", "Sites in the intent", m.sites.clone());
        r.register(
            "sites_by_state",
            "Sites by state, from every replica's agents' reports (recounted every 10 s)",
            m.sites_by_state.clone(),
        );
        r.register("enrolments", "Sites enrolled with a join token", m.enrolments.clone());
        r.register("renewals", "Site certificates renewed", m.renewals.clone());
        r.register("agent_refusals", "Agents refused, by reason", m.refusals.clone());
        r.register(
            "agent_statuses_coalesced",
            "Agents' status reports folded into a later write (an agent reporting more than 10 times a second)",
            m.statuses_coalesced.clone(),
        );
        Metrics { registry: Arc::new(r), ..m }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&Reason { reason }).inc();
    }

    pub fn applied(&self, outcome: &'static str, took: Duration) {
        self.applies.get_or_create(&Outcome { outcome }).inc();
        self.apply_duration.observe(took.as_secs_f64());
    }

    pub fn store(&self, operation: &'static str, took: Duration) {
        self.store_duration.get_or_create(&Operation { operation }).observe(took.as_secs_f64());
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Sets a gauge one higher while it lives.
#[derive(Debug)]
pub struct Held(&'static Gauge);

impl Held {
    pub fn new(gauge: &'static Gauge) -> Held {
        gauge.inc();
        Held(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The states a site can be in, as counted in `sites_by_state`.
pub const STATES: [&str; 6] = ["ok", "degraded", "down", "offline", "never", "revoked"];

/// Recounts the sites by state every `every`, from the store's reports.
pub async fn count_states<S: crate::store::IntentStore + 'static>(
    store: Arc<S>,
    fanout: Arc<crate::fanout::Fanout>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match crate::dashboard::summarise(&*store, &fanout).await {
            Ok(summary) => {
                for state in STATES {
                    let n = summary.rows.iter().filter(|r| r.state == state).count();
                    get().sites_by_state.get_or_create(&SiteState { state }).set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting the sites by state"),
        }
    }
}
