//! Failover: from the probes' health to each route group's candidate and
//! each picked peer's line.
//!
//! [`choices`] is the policy — health, the current choice and `now` in, the
//! choice out; [`machine::Machine`] is the state machine around it that the
//! agent drives with events (configurations, probe results, timer ticks)
//! and that answers with actions (build these choices, wake me then).

pub mod machine;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::datapath::Hops;
use crate::probe::{Health, Key};
use crate::reconcile::{path, picks_line, probes_lines};

/// How long a peer whose tunnel stopped answering keeps its route groups
/// while one of its lines still answers: the time for the line switch to
/// bring the tunnel back. After that it counts as down whatever its lines say.
const SWITCH_GRACE: Duration = Duration::from_secs(2);

/// How long an access point keeps a member site's prefixes on the site
/// after its tunnel stopped answering: the site picks its own lines, and
/// its first packet over a new one brings the tunnel back (WireGuard
/// follows it). Only a site gone for longer is sought over the interconnect.
const SITE_GRACE: Duration = Duration::from_secs(1);

/// The health of a probe target, as the prober knows it.
pub type HealthOf<'a> = &'a dyn Fn(&Key) -> Option<Health>;

/// What the policy decides from.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub config: &'a pb::SiteConfig,
    /// The health of a probe target; `None` when there is no probing.
    pub health: Option<HealthOf<'a>>,
    pub hops: &'a Hops,
    /// What is built now.
    pub active: &'a Choices,
    /// When the line to each peer last moved.
    pub line_moved: &'a BTreeMap<String, Instant>,
    pub hold_down: Duration,
    /// Aids used for their whole duration: closed whatever their condition.
    pub expired_aids: &'a BTreeSet<String>,
    pub now: Instant,
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("active", self.active)
            .field("hold_down", &self.hold_down)
            .finish_non_exhaustive()
    }
}

/// The route groups' candidates and the peers' paths, by health: a
/// route group stays with a peer that is up (or not judged yet) and goes
/// to a better one only after it has been up for the hold-down; a peer
/// whose tunnel stopped answering keeps its groups for
/// [`SWITCH_GRACE`] if one of its lines answered after the tunnel last
/// did and the line in use failed (the line switch is bringing it back),
/// or was switched since, and as long after one of its lines came back;
/// while it is not known yet whether the line in use failed with the
/// tunnel (its probes are judged later), it keeps them too. On an access point, a member site keeps its
/// prefixes for [`SITE_GRACE`] after going quiet and gets them back as
/// soon as it answers. A path is chosen the same way among the peer's
/// endpoints, best line first; a path the router has no route for is
/// used only when nothing else is.
pub fn choices(i: Inputs<'_>) -> Choices {
    let Inputs { config, health, hops, active, line_moved, hold_down, expired_aids, now } = i;
    let Some(health) = health else { return first_choices(config, hops) };
    let settled =
        |h: &Health, current: bool| current || h.since.is_none_or(|s| now.saturating_duration_since(s) >= hold_down);
    let path_key = |e: &pb::Endpoint| -> Option<Key> {
        let (local, remote) = path(config, e)?;
        hops.contains_key(&(local, remote)).then_some(Key::Path { local, remote })
    };
    // Whether a line to `peer` answered after its tunnel went quiet (more
    // than one tunnel probe after its last answer): the line under the
    // tunnel failed, not the peer, and a line switch is bringing the
    // tunnel back. (When the peer itself is gone, no line answers after
    // the tunnel went quiet, however slow its probes.) Gives when the
    // most recent such line came up.
    let line_outlived_tunnel = |peer: &str, tunnel: &Health| {
        config
            .segments
            .iter()
            .flat_map(|s| s.peers.iter().filter(|p| p.name == peer && probes_lines(p)))
            .flat_map(|p| &p.endpoints)
            .filter_map(path_key)
            .filter_map(|k| health(&k))
            .filter(|h| {
                // An answer within one tunnel probe of the tunnel's last
                // one is not later: the peer may have died in between.
                let after = tunnel.last_reply.map(|t| t + tunnel.interval);
                h.up && h.last_reply.is_some_and(|l| after.is_none_or(|t| l > t))
            })
            .filter_map(|h| h.since)
            .max()
    };
    // The health of the path a peer is reached over, when the agent picks it.
    let active_path_health = |peer: &str, local: &str, remote: &str| {
        config
            .segments
            .iter()
            .flat_map(|s| s.peers.iter().filter(|p| p.name == peer))
            .flat_map(|p| &p.endpoints)
            .find(|e| e.local_line == local && e.remote_line == remote)
            .and_then(path_key)
            .and_then(|k| health(&k))
    };
    // A peer is gone when a path to it failed while the same local line
    // still reaches another peer, and nothing of it — no tunnel of any
    // segment, no other line — answered since: every segment's groups leave
    // it at once, rather than each when its own tunnel is judged (up to a
    // probe interval apart, and each a decision and a build of its own).
    // A line that failed under the peer (the local one) reaches no other
    // peer either; a line switch is told by a line answering.
    // Every target of each peer (its tunnels, its paths), gathered once: an
    // access point ranks thousands of groups against thousands of peers.
    let mut targets_of: BTreeMap<&str, Vec<Key>> = BTreeMap::new();
    for s in &config.segments {
        for p in &s.peers {
            let keys = targets_of.entry(p.name.as_str()).or_default();
            keys.push(Key::tunnel(&s.segment, &p.name));
            keys.extend(p.endpoints.iter().filter_map(path_key));
        }
    }
    let is_gone = |peer: &str, targets: &[Key]| -> bool {
        targets.iter().any(|key| {
            let Key::Path { local, .. } = key else { return false };
            let Some(quiet) = health(key).filter(|h| !h.up).and_then(|h| Some(h.last_reply? + h.interval * 2)) else {
                return false;
            };
            let later = |h: &Health| h.last_reply.is_some_and(|t| t > quiet);
            let line_works = config
                .segments
                .iter()
                .flat_map(|s| s.peers.iter().filter(|p| p.name != peer && probes_lines(p)))
                .flat_map(|p| &p.endpoints)
                .filter_map(path_key)
                .filter(|k| matches!(k, Key::Path { local: l, .. } if l == local))
                .filter_map(|k| health(&k))
                .any(|h| h.up && later(&h));
            line_works && !targets.iter().filter_map(health).any(|h| later(&h))
        })
    };
    let gone: BTreeSet<&str> =
        targets_of.iter().filter(|(peer, targets)| is_gone(peer, targets)).map(|(peer, _)| *peer).collect();
    let members: BTreeSet<&str> = config
        .segments
        .iter()
        .flat_map(|s| s.peers.iter().filter(|p| p.role() == pb::PeerRole::Site).map(|p| p.name.as_str()))
        .collect();
    let group_rank = |seg: &str, group: &str, peer: &str| {
        let current = active.groups.get(&(seg.to_string(), group.to_string())).is_some_and(|c| c == peer);
        let down_for = |h: &Health| h.since.map_or(Duration::MAX, |s| now.saturating_duration_since(s));
        if gone.contains(peer) {
            return 2;
        }
        match health(&Key::tunnel(seg, peer)) {
            // A member site whose tunnel has not answered yet (an access
            // point just restarted: the site's WireGuard retries its
            // handshake only every 5 s) is reached over the interconnect,
            // through the access point it still answers, until it does.
            None if members.contains(peer) => 1,
            None => 0,
            // A member site is the only way in to itself: back at once.
            Some(h) if h.up && members.contains(peer) => 0,
            // Back to a peer once its tunnel and everything else of it that
            // answers has been up for the hold-down (a peer left because it
            // was gone may come back before its tunnel was ever judged down).
            Some(h) if h.up => {
                let steady = targets_of
                    .get(peer)
                    .into_iter()
                    .flatten()
                    .filter_map(health)
                    .all(|t| !t.up || settled(&t, current));
                u8::from(!(settled(&h, current) && steady))
            }
            // A member site that went quiet may be switching lines — not
            // one still heard on every line it was heard on: its tunnel
            // alone failed, and it has moved its own traffic already.
            Some(h) if members.contains(peer) => {
                if current && down_for(&h) < SITE_GRACE && !member_heard_after(config, health, peer, &h, now) {
                    0
                } else {
                    2
                }
            }
            Some(h) => {
                // Only a line that failed is switched: while the path in
                // use still answers, a quiet tunnel is the peer's own
                // (its WireGuard died before the rest of it). Which of the
                // two is judged first is the order probes happen to arrive
                // in, so the replies decide: the path failed when it is
                // judged down; it still answers when it answered clearly
                // after the tunnel went quiet; until one of the two, it is
                // not known yet and the peer keeps its groups (the machine
                // wakes when it must be known: `machine::Machine`'s wake-ups).
                let path = active.paths.get(peer).and_then(|(l, r)| active_path_health(peer, l, r));
                let path_failed = path.as_ref().is_none_or(|p| !p.up);
                let undecided = path.as_ref().is_some_and(|p| p.up && !answered_after(p, &h));
                // The grace runs from the tunnel going quiet, or from a
                // line coming back (a site whose lines all return).
                let outlived = line_outlived_tunnel(peer, &h);
                let switching = path_failed
                    && outlived.is_some_and(|line_up| {
                        down_for(&h) < SWITCH_GRACE || now.saturating_duration_since(line_up) < SWITCH_GRACE
                    });
                // The line was switched after the tunnel went quiet and the
                // tunnel has not come back yet: it is re-handshaking over
                // the new line (the path in use answers, so the test above
                // no longer tells a line switch from the peer's own failure).
                let switched = outlived.is_some()
                    && line_moved.get(peer).is_some_and(|at| {
                        h.last_reply.is_none_or(|quiet| *at >= quiet)
                            && now.saturating_duration_since(*at) < SWITCH_GRACE
                    });
                let switching = switching || switched || (undecided && outlived.is_some());
                // Otherwise its own failure: the groups leave at once. (A
                // tunnel judged down only because a busy host held its
                // answers up gets back its time up from the prober when
                // they arrive, and its groups come back at once.)
                if switching && current { 0 } else { 2 }
            }
        }
    };
    let path_rank = |peer: &str, e: &pb::Endpoint| {
        let Some(key) = path_key(e) else { return 3 };
        let current = active.paths.get(peer).is_some_and(|(l, r)| *l == e.local_line && *r == e.remote_line);
        // A peer that is gone keeps its line: its other paths are only not
        // judged yet, and a move towards it (pins, fence, endpoints) would
        // be written for nothing while its groups move away — then moved
        // back when those paths are judged down too.
        if gone.contains(peer) {
            return if current { 0 } else { 2 };
        }
        match health(&key) {
            None => 0,
            Some(h) if h.up => u8::from(!settled(&h, current)),
            Some(_) => 2,
        }
    };
    let current = |seg: &str, group: &str| active.groups.get(&(seg.to_string(), group.to_string())).cloned();
    choose(config, &group_rank, &path_rank, &current, expired_aids)
}

/// The mutual aids the choices use: a route group on one of an aid's
/// access points.
pub fn aids_in_use(config: &SiteConfig, choices: &Choices) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for seg in config.segments.iter().filter(|s| !s.aids.is_empty()) {
        for g in &seg.route_groups {
            let Some(c) = choices.groups.get(&(seg.segment.clone(), g.name.clone())) else { continue };
            out.extend(seg.aids.iter().filter(|a| a.access_points.contains(c)).map(|a| a.name.clone()));
        }
    }
    out
}

/// The peers whose line moved from `before` to `after` because the path in
/// use failed (its probes judged it down): nothing arrives over that line
/// any more, so their endpoints may move before the old line is fenced
/// (see `reconcile::move_lines`). A move away from a line that still
/// answers (back to the preferred line after the hold-down) is not one.
pub fn failed_lines(config: &SiteConfig, before: &Choices, after: &Choices, health: HealthOf<'_>) -> BTreeSet<String> {
    after
        .paths
        .iter()
        .filter_map(|(peer, now)| Some((peer, before.paths.get(peer).filter(|b| *b != now)?)))
        .filter(|(peer, (local, remote))| {
            config
                .segments
                .iter()
                .flat_map(|s| s.peers.iter().filter(|p| &p.name == *peer))
                .flat_map(|p| &p.endpoints)
                .find(|e| &e.local_line == local && &e.remote_line == remote)
                .and_then(|e| path(config, e))
                .and_then(|(local, remote)| health(&Key::Path { local, remote }))
                .is_some_and(|h| !h.up)
        })
        .map(|(peer, _)| peer.clone())
        .collect()
}

/// How long after a tunnel's last answer a path probed beside it may still
/// have answered and yet have gone quiet with it: the last answers of two
/// targets probed on timers can be up to two intervals apart when the line
/// under both dies.
pub(crate) fn quiet_window(tunnel: &Health, path_interval: Duration) -> Duration {
    tunnel.interval.max(path_interval) * 2
}

/// Whether `path` answered clearly after `tunnel` went quiet (beyond the
/// [`quiet_window`]): it did not fail with the tunnel.
fn answered_after(path: &Health, tunnel: &Health) -> bool {
    let Some(tunnel_last) = tunnel.last_reply else { return true };
    path.last_reply.is_some_and(|l| l > tunnel_last + quiet_window(tunnel, path.interval))
}

/// Whether a member site whose tunnel to this access point went quiet is
/// still heard over its lines: its underlay probes ([`Key::Heard`]) arrived
/// clearly after the tunnel's last answer (beyond the [`quiet_window`]) on
/// a line, and no line that was heard until about then has missed two of
/// its probes since. Then the tunnel failed alone (a site switching lines
/// falls silent on the line it leaves) and the site's prefixes need not
/// wait for it. A slowly probed line not heard since is not known yet and
/// does not count: moving a member's prefixes a moment early costs a move,
/// and they come back as soon as its tunnel answers; waiting for the grace
/// costs the traffic entering here a second.
fn member_heard_after(config: &SiteConfig, health: HealthOf<'_>, member: &str, tunnel: &Health, now: Instant) -> bool {
    let Some(quiet) = tunnel.last_reply else { return false };
    let default = config.probe.unwrap_or_default();
    // Each line of the member, with the fastest probing of it towards this
    // router's lines (it is heard at that pace).
    let mut lines: BTreeMap<std::net::IpAddr, pb::ProbeSettings> = BTreeMap::new();
    let endpoints =
        config.segments.iter().flat_map(|s| s.peers.iter().filter(|p| p.name == member)).flat_map(|p| &p.endpoints);
    for e in endpoints {
        let Ok(address) = e.address.parse() else { continue };
        let probe = e.probe.unwrap_or(default);
        let fastest = lines.entry(address).or_insert(probe);
        if probe.interval_ms < fastest.interval_ms {
            *fastest = probe;
        }
    }
    let mut heard_after = false;
    for (remote, probe) in lines {
        let Some(last) = health(&Key::Heard { remote }).and_then(|h| h.last_reply) else { continue };
        let (interval, multiplier) = crate::probe::timing(probe);
        let silent = now.saturating_duration_since(last) > interval * 2;
        if last > quiet + quiet_window(tunnel, interval) {
            heard_after = true;
        } else if silent && last + interval * multiplier > quiet {
            // Heard until about when the tunnel went quiet, not since.
            return false;
        }
    }
    heard_after
}

/// What the agent has chosen among the alternatives a configuration gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choices {
    /// Route groups' active candidates, by (segment, group).
    pub groups: BTreeMap<(String, String), String>,
    /// The active path of each peer whose line the agent picks (access
    /// points and the interconnect), by peer name: (local line, remote line).
    pub paths: BTreeMap<String, (String, String)>,
}

/// The best of `items` by `rank` (0 is best), the earlier on a tie.
fn best<T>(items: impl Iterator<Item = T>, rank: impl Fn(&T) -> u8) -> Option<T> {
    items.enumerate().min_by_key(|(i, t)| (rank(t), *i)).map(|(_, t)| t)
}

/// The agent's choices: for each route group, among its candidates with a
/// key, the best by `group_rank(segment, group, peer)`; for each peer whose
/// line it picks, the best of its endpoints (ordered by line priority) by
/// `path_rank(peer, endpoint)`. Ranks are 0 for best; a tie goes to the
/// earlier — nothing is ever left without a way.
pub fn choose(
    config: &SiteConfig,
    group_rank: &dyn Fn(&str, &str, &str) -> u8,
    path_rank: &dyn Fn(&str, &pb::Endpoint) -> u8,
    current: &dyn Fn(&str, &str) -> Option<String>,
    expired_aids: &BTreeSet<String>,
) -> Choices {
    let mut out = Choices::default();
    for seg in &config.segments {
        let keyed: BTreeSet<&str> =
            seg.peers.iter().filter(|p| !p.public_key.is_empty()).map(|p| p.name.as_str()).collect();
        for g in &seg.route_groups {
            let rank = |c: &String| group_rank(&seg.segment, &g.name, c);
            let keyed_candidates = || g.candidates.iter().filter(|c| keyed.contains(c.as_str()));
            let aid_of = |c: &str| seg.aids.iter().find(|a| a.access_points.iter().any(|p| p == c));
            // The segment's own candidates first; an aid's only while it is
            // open: activated by an operator, or (automatic) while none of
            // the own is usable — no own candidate up and settled, and the
            // group either on an aid already or every own one down.
            let own_best = keyed_candidates().filter(|c| aid_of(c).is_none()).map(&rank).min().unwrap_or(u8::MAX);
            let current = current(&seg.segment, &g.name);
            let on_aid = current.is_some_and(|c| aid_of(&c).is_some());
            let open = |c: &String| match aid_of(c) {
                None => true,
                Some(a) if expired_aids.contains(&a.name) => false,
                Some(a) => a.active || (a.automatic && (own_best >= 2 || (own_best == 1 && on_aid))),
            };
            if let Some(c) = best(keyed_candidates().filter(|c| open(c)), |c| rank(c)) {
                out.groups.insert((seg.segment.clone(), g.name.clone()), c.clone());
            }
        }
        for p in seg.peers.iter().filter(|p| picks_line(config, p)) {
            if out.paths.contains_key(&p.name) {
                continue;
            }
            if let Some(e) = best(p.endpoints.iter(), |e| path_rank(&p.name, e)) {
                out.paths.insert(p.name.clone(), (e.local_line.clone(), e.remote_line.clone()));
            }
        }
    }
    out
}

/// The choices before any health is known: every route group's first
/// candidate with a key, every peer's first path the router has a route for.
pub fn first_choices(config: &SiteConfig, hops: &Hops) -> Choices {
    let routed = |e: &pb::Endpoint| path(config, e).is_some_and(|pair| hops.contains_key(&pair));
    choose(config, &|_, _, _| 0, &|_, e| if routed(e) { 0 } else { 1 }, &|_, _| None, &BTreeSet::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer with a key, on a tunnel named after it.
    fn peer(name: &str, role: pb::PeerRole, tunnel: &str) -> pb::Peer {
        pb::Peer {
            name: name.into(),
            interface: format!("{tunnel}{name}"),
            role: role.into(),
            public_key: format!("key-of-{name}"),
            ..Default::default()
        }
    }

    /// An east access point: member site `office-b` (reached directly) and
    /// the west access point over the interconnect, both candidates of
    /// office-b's route group, the member first.
    pub(super) fn access_point() -> SiteConfig {
        let peer = |name: &str, role: pb::PeerRole| peer(name, role, "mv-");
        SiteConfig {
            site: "ap-east".into(),
            segments: vec![pb::SegmentConfig {
                segment: "office".into(),
                peers: vec![peer("office-b", pb::PeerRole::Site), peer("ap-west", pb::PeerRole::AccessPoint)],
                route_groups: vec![pb::RouteGroup {
                    name: "office-b".into(),
                    prefixes: vec!["10.2.0.0/24".into()],
                    candidates: vec!["office-b".into(), "ap-west".into()],
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A member site of `pref-lan` with its own pair and an aiding one.
    pub(super) fn aided_member(automatic: bool, active: bool) -> SiteConfig {
        let peer = |name: &str| peer(name, pb::PeerRole::AccessPoint, "m-");
        SiteConfig {
            site: "office-a".into(),
            segments: vec![pb::SegmentConfig {
                segment: "pref-lan".into(),
                peers: ["loc-east", "loc-west", "nat-east", "nat-west"].into_iter().map(peer).collect(),
                route_groups: vec![pb::RouteGroup {
                    name: "pref-lan".into(),
                    prefixes: vec!["10.20.0.0/16".into()],
                    candidates: ["loc-east", "loc-west", "nat-east", "nat-west"].map(String::from).to_vec(),
                }],
                aids: vec![pb::AidConfig {
                    name: "pref-aid".into(),
                    access_points: vec!["nat-east".into(), "nat-west".into()],
                    automatic,
                    active,
                    max_duration_ms: 3_600_000,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Mutual aid is dormant while one of the segment's own access points
    /// answers; an automatic one opens when both are down and closes only
    /// once one of them is back for the hold-down; a manual one only when
    /// activated (then it is one more candidate, after the own ones).
    #[test]
    fn an_aid_opens_when_both_own_access_points_are_down_and_closes_after_the_hold_down() {
        let now = Instant::now();
        let h = |up: bool, since_s: u64| Health {
            up,
            since: Some(now - Duration::from_secs(since_s)),
            last_reply: Some(now - Duration::from_secs(if up { 0 } else { since_s })),
            interval: Duration::from_millis(50),
            ..Default::default()
        };
        let key = ("pref-lan".to_string(), "pref-lan".to_string());
        let pick = |config: &SiteConfig, own: [Health; 2], current: &str| {
            let active = Choices { groups: BTreeMap::from([(key.clone(), current.to_string())]), ..Default::default() };
            let health = move |k: &Key| match k {
                Key::Tunnel { peer, .. } if peer == "loc-east" => Some(own[0].clone()),
                Key::Tunnel { peer, .. } if peer == "loc-west" => Some(own[1].clone()),
                Key::Tunnel { .. } => Some(h(true, 600)),
                _ => None,
            };
            let inputs = Inputs {
                config,
                health: Some(&health),
                hops: &Hops::new(),
                active: &active,
                line_moved: &BTreeMap::new(),
                hold_down: Duration::from_secs(3),
                expired_aids: &BTreeSet::new(),
                now,
            };
            let c = choices(inputs);
            (c.groups.get(&key).cloned().unwrap_or_default(), aids_in_use(config, &c).into_iter().collect::<Vec<_>>())
        };
        let automatic = aided_member(true, false);
        assert_eq!(first_choices(&automatic, &Hops::new()).groups[&key], "loc-east", "dormant at the start");
        assert_eq!(pick(&automatic, [h(true, 600), h(true, 600)], "loc-east").0, "loc-east");
        assert_eq!(pick(&automatic, [h(false, 1), h(true, 600)], "loc-east").0, "loc-west", "the own pair first");
        assert_eq!(
            pick(&automatic, [h(false, 1), h(false, 1)], "loc-west"),
            ("nat-east".to_string(), vec!["pref-aid".to_string()]),
            "both own down: the aid opens"
        );
        assert_eq!(pick(&automatic, [h(true, 1), h(false, 9)], "nat-east").0, "nat-east", "own back, not settled");
        assert_eq!(
            pick(&automatic, [h(true, 1), h(false, 9)], "loc-west").0,
            "loc-east",
            "not on the aid: an own one up, even unsettled, keeps it closed"
        );
        assert_eq!(
            pick(&automatic, [h(true, 4), h(false, 9)], "nat-east"),
            ("loc-east".to_string(), vec![]),
            "back for the hold-down: the aid closes"
        );
        let manual = aided_member(false, false);
        assert_eq!(pick(&manual, [h(false, 1), h(false, 1)], "loc-west").0, "loc-east", "never on its own");
        let activated = aided_member(false, true);
        assert_eq!(pick(&activated, [h(false, 1), h(false, 1)], "loc-west").0, "nat-east", "activated");
        assert_eq!(pick(&activated, [h(true, 600), h(true, 600)], "loc-east").0, "loc-east", "after the own pair");
    }

    /// An access point that just restarted has not heard its member yet
    /// (the member's WireGuard retries its handshake only every 5 s): the
    /// member is reached through the other access point, which it still
    /// answers, until its own tunnel answers; then directly at once.
    #[test]
    fn a_member_not_heard_yet_is_reached_over_the_interconnect_until_it_answers() {
        let config = access_point();
        let now = Instant::now();
        let up = Health {
            up: true,
            since: Some(now - Duration::from_secs(60)),
            last_reply: Some(now),
            interval: Duration::from_millis(50),
            ..Default::default()
        };
        let restored = first_choices(&config, &Hops::new());
        let key = ("office".to_string(), "office-b".to_string());
        assert_eq!(restored.groups[&key], "office-b", "the restored configuration routes the member directly");
        // The group's pick, given the health of office-b's tunnel and of
        // the west access point's.
        let pick = |member: Option<Health>, west: Option<Health>| {
            let health = move |k: &Key| match k {
                Key::Tunnel { peer, .. } if peer == "ap-west" => west.clone(),
                Key::Tunnel { peer, .. } if peer == "office-b" => member.clone(),
                _ => None,
            };
            let inputs = Inputs {
                config: &config,
                health: Some(&health),
                hops: &Hops::new(),
                active: &restored,
                line_moved: &BTreeMap::new(),
                hold_down: Duration::from_secs(3),
                expired_aids: &BTreeSet::new(),
                now,
            };
            choices(inputs).groups[&key].clone()
        };
        assert_eq!(pick(None, Some(up.clone())), "ap-west", "not heard yet: over the interconnect");
        let answered = Health { since: Some(now), ..up.clone() };
        assert_eq!(pick(Some(answered), Some(up.clone())), "office-b", "heard: directly, without a hold-down");
        // Neither heard yet (both just started): the other access point,
        // whose own split horizon drops what it cannot deliver yet.
        assert_eq!(pick(None, None), "ap-west");
    }

    /// A member whose tunnel to this access point went quiet keeps its
    /// prefixes for the grace while it may be switching lines — but not
    /// when it is still heard on every line it was heard on: its tunnel
    /// alone failed (a drill: office-a's office tunnel to ap-west blocked,
    /// its lines up; office-b's traffic to office-a, which enters at
    /// ap-west, waited 1,130 ms for the grace).
    #[test]
    fn a_member_still_heard_on_its_lines_is_not_given_the_line_switch_grace() {
        let mut config = access_point();
        let line = |address: &str, interval_ms: u32| pb::Endpoint {
            address: address.into(),
            probe: Some(pb::ProbeSettings { interval_ms, multiplier: 3 }),
            ..Default::default()
        };
        // A fibre probed every 50 ms, a mobile line every 100 ms.
        config.segments[0].peers[0].endpoints = vec![line("192.0.2.12", 50), line("198.51.100.12", 100)];
        let t0 = Instant::now() + Duration::from_secs(1);
        let now = t0 + Duration::from_millis(150);
        let quiet = Health {
            up: false,
            since: Some(now),
            last_reply: Some(t0),
            interval: Duration::from_millis(50),
            ..Default::default()
        };
        let west =
            Health { up: true, since: Some(t0 - Duration::from_secs(60)), last_reply: Some(now), ..quiet.clone() };
        let active = first_choices(&config, &Hops::new());
        let key = ("office".to_string(), "office-b".to_string());
        let fibre: std::net::IpAddr = "192.0.2.12".parse().expect("address");
        // The group's pick when each line was last heard (ms from t0).
        let pick = |fibre_ms: Option<i64>, mobile_ms: Option<i64>| {
            let heard = |ms: Option<i64>| {
                ms.map(|ms| {
                    let at = if ms >= 0 {
                        t0 + Duration::from_millis(ms.unsigned_abs())
                    } else {
                        t0 - Duration::from_millis(ms.unsigned_abs())
                    };
                    Health { up: true, last_reply: Some(at), ..Default::default() }
                })
            };
            let (fibre_heard, mobile_heard, quiet, west) =
                (heard(fibre_ms), heard(mobile_ms), quiet.clone(), west.clone());
            let health = move |k: &Key| match k {
                Key::Tunnel { peer, .. } if peer == "ap-west" => Some(west.clone()),
                Key::Tunnel { .. } => Some(quiet.clone()),
                Key::Heard { remote } if *remote == fibre => fibre_heard.clone(),
                Key::Heard { .. } => mobile_heard.clone(),
                Key::Path { .. } => None,
            };
            let inputs = Inputs {
                config: &config,
                health: Some(&health),
                hops: &Hops::new(),
                active: &active,
                line_moved: &BTreeMap::new(),
                hold_down: Duration::from_secs(3),
                expired_aids: &BTreeSet::new(),
                now,
            };
            choices(inputs).groups[&key].clone()
        };
        assert_eq!(
            pick(Some(140), Some(130)),
            "ap-west",
            "heard since on the fibre, the mobile line not due yet: at once"
        );
        assert_eq!(pick(Some(140), None), "ap-west", "its only line heard since: at once");
        assert_eq!(pick(Some(140), Some(-60)), "office-b", "the mobile line fell silent with the tunnel: switching");
        assert_eq!(pick(Some(20), Some(130)), "office-b", "the fibre fell silent with the tunnel: switching");
        assert_eq!(pick(Some(140), Some(-900)), "ap-west", "a line silent long before the tunnel does not count");
        assert_eq!(pick(None, None), "office-b", "not heard at all: the grace");
        assert_eq!(pick(Some(90), None), "office-b", "heard within the quiet window only: not known yet");
    }
}
