//! WireGuard key rotation, make before break, as the public keys record it.
//!
//! A site's entry in [`PublicKeys`] holds, beside its segments' current
//! keys, a few entries whose names begin with `+` (no segment name can):
//!
//! - `+next/<segment>`: the next key the agent made for that segment while
//!   a rotation prepares; its peers hold it beside the current one;
//! - `+rotation`: the rotation under way, `<id> <phase>`;
//! - `+since`: when the current keys were registered (Unix ms);
//! - `+switched`: the rotation whose switch the agent confirmed (it reported
//!   its next keys as its keys), until the rotation is done.
//!
//! A rotation goes: *prepare* (the agent makes its next keys and reports
//! their public halves; every peer is given them and holds them with no
//! addresses), then *switch* (once every connected peer holds them, one
//! commit sets the switch's instant a little ahead, [`switch_lead_ms`]: at
//! that instant the peers move the site's addresses to the next keys while
//! the agent switches its interfaces over — all at once, not each when the
//! commit reaches it), then done (once the instant passed and the agent
//! confirmed the switch, the next keys are recorded as the site's keys). A
//! revocation drops the keys at once and asks for *fresh* ones. What is due
//! when is [`due`]: pure, `now` an argument.

use std::collections::{BTreeMap, BTreeSet};

use crate::compile::PublicKeys;

/// The prefix of a next key's entry.
pub const NEXT: &str = "+next/";
/// The entry of the rotation under way.
pub const ROTATION: &str = "+rotation";
/// The entry of when the current keys were registered.
pub const SINCE: &str = "+since";
/// The entry of the rotation whose switch the agent confirmed.
pub const SWITCHED: &str = "+switched";

/// Whether an entry of a site's keys is a segment's current key.
pub fn is_segment_key(name: &str) -> bool {
    !name.starts_with('+')
}

/// The entry of `segment`'s next key.
pub fn next_entry(segment: &str) -> String {
    format!("{NEXT}{segment}")
}

/// The phase of a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// The agent makes its next keys; the peers are given them.
    Prepare,
    /// The next keys are the site's keys; the agent switches to them.
    Switch,
    /// The keys were revoked; the agent makes fresh ones.
    Fresh,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Switch => "switch",
            Phase::Fresh => "fresh",
        }
    }
}

/// A rotation under way: its id (when it was asked for, Unix ms), phase
/// and, once it switches, the switch's instant (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub id: u64,
    pub phase: Phase,
    pub switch_at: Option<u64>,
}

impl Rotation {
    /// Reads `<id> <phase>` or `<id> switch <instant>`.
    pub fn parse(text: &str) -> Option<Rotation> {
        let mut words = text.split_whitespace();
        let id = words.next()?.parse().ok()?;
        let phase = match words.next()? {
            "prepare" => Phase::Prepare,
            "switch" => Phase::Switch,
            "fresh" => Phase::Fresh,
            _ => return None,
        };
        let switch_at = match words.next() {
            Some(at) if phase == Phase::Switch => Some(at.parse().ok()?),
            Some(_) => return None,
            None => None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(Rotation { id, phase, switch_at })
    }

    pub fn text(&self) -> String {
        match self.switch_at {
            Some(at) => format!("{} {} {at}", self.id, self.phase.as_str()),
            None => format!("{} {}", self.id, self.phase.as_str()),
        }
    }
}

/// How far ahead of the switch's commit its instant is set, for a site
/// with `peers` peers: long enough for the commit to reach every peer's
/// agent (the fan-out sends about a thousand configurations a second on a
/// small controller; a lab's few arrive within 100 ms), so that all of them
/// act at the instant rather than each when the commit arrives. One second,
/// and a millisecond more per peer, at most a minute.
pub fn switch_lead_ms(peers: usize) -> u64 {
    (1_000 + peers as u64).min(60_000)
}

/// The peer's switch instant (Unix ms) to give its peers while `site_keys`
/// say it switches (0: none), for `Peer.switch_at_unix_ms`.
pub fn peer_switch_at(site_keys: &BTreeMap<String, String>) -> u64 {
    match site_rotation(site_keys) {
        Some(Rotation { phase: Phase::Switch, switch_at: Some(at), .. }) => at,
        _ => 0,
    }
}

/// The rotation under way at `site`, if any.
pub fn rotation(keys: &PublicKeys, site: &str) -> Option<Rotation> {
    keys.get(site).and_then(site_rotation)
}

/// The rotation under way, from one site's entries.
pub fn site_rotation(site_keys: &BTreeMap<String, String>) -> Option<Rotation> {
    site_keys.get(ROTATION).and_then(|t| Rotation::parse(t))
}

/// The next key of `site`'s `segment`, if a rotation prepares one. Cheap
/// for a site without any `+` entry (the sorted map's first entry tells:
/// `+` sorts before every letter and digit).
pub fn next_key<'a>(site_keys: &'a BTreeMap<String, String>, segment: &str) -> Option<&'a String> {
    if !site_keys.first_key_value().is_some_and(|(k, _)| k.starts_with('+')) {
        return None;
    }
    site_keys.get(&next_entry(segment))
}

/// When `site`'s current keys were registered, if known.
pub fn since(keys: &PublicKeys, site: &str) -> Option<u64> {
    keys.get(site).and_then(site_since)
}

/// When the current keys were registered, from one site's entries.
pub fn site_since(site_keys: &BTreeMap<String, String>) -> Option<u64> {
    site_keys.get(SINCE).and_then(|t| t.trim().parse().ok())
}

/// How scheduled rotations are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Keys older than this are rotated (ms); 0: never.
    pub period_ms: u64,
    /// At most this many rotations under way at once, fleet-wide.
    pub at_once: usize,
}

/// A site's own offset into the last quarter of the period, from its name:
/// sites whose keys were registered together (a fleet enrolled in a day)
/// rotate spread over a quarter of the period, not all at the same minute.
pub fn offset_ms(site: &str, period_ms: u64) -> u64 {
    let spread = period_ms / 4;
    if spread == 0 {
        return 0;
    }
    // FNV-1a: stable across versions and replicas.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h % spread
}

/// The sites whose keys are due for a scheduled rotation at `now_ms`:
/// registered more than the period ago less the site's offset, none under
/// way already, the oldest first, as many as the fleet-wide limit leaves
/// room for. `since` gives each site's registration time; a site without
/// one (keys registered before it was recorded) is not due.
pub fn due(now_ms: u64, since: &BTreeMap<String, u64>, rotating: &BTreeSet<String>, schedule: Schedule) -> Vec<String> {
    if schedule.period_ms == 0 || rotating.len() >= schedule.at_once {
        return Vec::new();
    }
    let mut ready: Vec<(u64, &String)> = since
        .iter()
        .filter(|(site, _)| !rotating.contains(*site))
        .filter_map(|(site, at)| {
            let due_at = at.saturating_add(schedule.period_ms).saturating_sub(offset_ms(site, schedule.period_ms));
            (due_at <= now_ms).then_some((due_at, site))
        })
        .collect();
    ready.sort();
    ready.into_iter().take(schedule.at_once - rotating.len()).map(|(_, s)| s.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    #[test]
    fn a_rotation_reads_back_and_nonsense_is_none() {
        for phase in [Phase::Prepare, Phase::Switch, Phase::Fresh] {
            let r = Rotation { id: 1_796_000_000_123, phase, switch_at: None };
            assert_eq!(Rotation::parse(&r.text()), Some(r));
        }
        let r = Rotation { id: 7, phase: Phase::Switch, switch_at: Some(1_796_000_001_000) };
        assert_eq!(r.text(), "7 switch 1796000001000");
        assert_eq!(Rotation::parse(&r.text()), Some(r));
        let keys = BTreeMap::from([(ROTATION.to_string(), r.text())]);
        assert_eq!(peer_switch_at(&keys), 1_796_000_001_000);
        assert_eq!(peer_switch_at(&BTreeMap::from([(ROTATION.to_string(), "7 switch".to_string())])), 0);
        assert_eq!(Rotation::parse("7 prepare 12"), None, "only a switch has an instant");
        assert_eq!(Rotation::parse("7 switch soon"), None);
        assert_eq!(Rotation::parse("7 switch 1 2"), None);
        assert_eq!(switch_lead_ms(3), 1_003);
        assert_eq!(switch_lead_ms(10_000), 11_000);
        assert_eq!(switch_lead_ms(1_000_000), 60_000);
        assert_eq!(Rotation::parse("12 later"), None);
        assert_eq!(Rotation::parse("x prepare"), None);
        assert_eq!(Rotation::parse(""), None);
    }

    #[test]
    fn next_keys_are_found_only_beside_a_plus_entry() {
        let mut k = BTreeMap::from([("office".to_string(), "A".to_string())]);
        assert_eq!(next_key(&k, "office"), None);
        k.insert(next_entry("office"), "B".into());
        assert_eq!(next_key(&k, "office").map(String::as_str), Some("B"));
        assert_eq!(next_key(&k, "guest"), None);
        assert!(is_segment_key("office") && !is_segment_key(ROTATION) && !is_segment_key(&next_entry("office")));
    }

    /// A fleet enrolled on one day, with a 30-day period and at most 3 at
    /// once: nothing is due before 22.5 days; from then on sites come due
    /// one by one over the last quarter of the period, never more than
    /// three under way; every site is due by day 30.
    #[test]
    fn scheduled_rotations_are_spread_over_a_quarter_of_the_period_and_limited() {
        let schedule = Schedule { period_ms: 30 * DAY, at_once: 3 };
        let since: BTreeMap<String, u64> = (0..200).map(|i| (format!("school-{i:03}"), 1_000)).collect();
        let none = BTreeSet::new();
        assert!(due(1_000 + 22 * DAY, &since, &none, schedule).is_empty(), "nothing before the last quarter");
        let offsets: BTreeSet<u64> = since.keys().map(|s| offset_ms(s, schedule.period_ms) / DAY).collect();
        assert!(offsets.len() >= 7, "spread over the quarter: {offsets:?}");
        // Day by day: how many are due (without a limit).
        let all = Schedule { at_once: usize::MAX, ..schedule };
        let mut last = 0;
        for day in 23..=30 {
            let n = due(1_000 + day * DAY, &since, &none, all).len();
            assert!(n >= last, "day {day}: {n} after {last}");
            assert!(day == 30 || n < 200, "day {day}: all due already");
            last = n;
        }
        assert_eq!(last, 200, "every site due by the end of the period");
        // The limit: three at once, the oldest first; none while three run.
        let now = 1_000 + 30 * DAY;
        let first = due(now, &since, &none, schedule);
        assert_eq!(first.len(), 3);
        let rotating: BTreeSet<String> = first.iter().cloned().collect();
        assert!(due(now, &since, &rotating, schedule).is_empty());
        let one: BTreeSet<String> = first[..2].iter().cloned().collect();
        let next = due(now, &since, &one, schedule);
        assert_eq!(next.len(), 1);
        assert!(!one.contains(&next[0]));
        // A site rotated just now is not due again.
        let mut fresh = since.clone();
        fresh.insert(first[0].clone(), now);
        assert!(!due(now, &fresh, &none, all).contains(&first[0]));
        // Off.
        assert!(due(now, &since, &none, Schedule { period_ms: 0, at_once: 3 }).is_empty());
    }
}
