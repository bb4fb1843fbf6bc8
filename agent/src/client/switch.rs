//! A key rotation's switch at its instant (see `KeyRotation` and
//! `Peer.switch_at_unix_ms`): the controller sets the instant a little
//! ahead, and every agent concerned acts on it then — the rotating site
//! takes its next keys, its peers move its addresses to its next key and
//! drop the old one — so that what a rotation loses is the spread of the
//! agents' clocks and first writes, not the spread of the commit's
//! deliveries. The first writes are prepared ahead and written without
//! observing (see `Agent::switch_due`); the full build follows.

use musubi_proto::v1 as pb;

/// How long after the instant the peers take the next key, the rotating
/// site switching at the instant itself: its handshake (it probes every
/// peer right after its switch) reaches each peer's next-key entry first,
/// so that the peer, taking the key, finds a session and starts no
/// handshake of its own. When both start one within a round trip of the
/// other (crossed), each takes the other's initiation and drops the answer
/// to its own, and wireguard-go starts none again for 5 s: the tunnel
/// stayed dead until the failover moved traffic, 123–145 ms, in about one
/// site rotation in 20 when both acted at the same instant.
pub const PEER_LAG_MS: u64 = 20;

/// What [`settle`] did and asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// The earliest switch instant still ahead (a peer's or this site's
    /// own), when the agent must look again.
    pub ahead: Option<u64>,
    /// The peers that switched: their tunnel, the key they replaced and
    /// their key now.
    pub switched: Vec<(String, String, String)>,
}

/// Takes, in `config`, the next key of every peer whose switch instant is
/// [`PEER_LAG_MS`] or more before `now_ms` as its key.
pub fn settle(config: &mut pb::SiteConfig, now_ms: u64) -> Settled {
    let mut out = Settled { ahead: own_switch(config).filter(|at| *at > now_ms), switched: Vec::new() };
    for peer in config.segments.iter_mut().flat_map(|s| s.peers.iter_mut()) {
        if peer.switch_at_unix_ms == 0 || peer.next_public_key.is_empty() {
            continue;
        }
        let at = peer.switch_at_unix_ms.saturating_add(PEER_LAG_MS);
        if at <= now_ms {
            let old = crate::reconcile::take_next_key(peer);
            out.switched.push((peer.interface.clone(), old, peer.public_key.clone()));
        } else {
            out.ahead = Some(out.ahead.map_or(at, |a| a.min(at)));
        }
    }
    out
}

/// Whether a peer of `config` will switch keys at an instant ahead.
pub fn peers_switch(config: &pb::SiteConfig) -> bool {
    config.segments.iter().flat_map(|s| &s.peers).any(|p| p.switch_at_unix_ms != 0 && !p.next_public_key.is_empty())
}

/// The site's own switch instant, while its rotation switches (0: at once).
fn own_switch(config: &pb::SiteConfig) -> Option<u64> {
    config.key_rotation.as_ref().filter(|r| r.phase() == pb::KeyPhase::Switch).map(|r| r.switch_at_unix_ms)
}

/// Whether the site's own switch is due at `now_ms` (a switch without an
/// instant is due at once).
pub fn own_switch_due(config: &pb::SiteConfig, now_ms: u64) -> bool {
    own_switch(config).is_some_and(|at| at <= now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, next: &str, at: u64) -> pb::Peer {
        pb::Peer {
            name: name.into(),
            public_key: format!("{name}-old"),
            next_public_key: next.into(),
            switch_at_unix_ms: at,
            interface: format!("mm-{name}"),
            ..Default::default()
        }
    }

    /// A scripted timeline: two peers switch at 1,000 and 2,000, one holds
    /// a next key with no instant yet (prepare), the site itself switches at
    /// 1,500. Before each instant nothing changes and the earliest instant
    /// ahead is asked for; at it the next key becomes the key, once.
    #[test]
    fn peers_take_their_next_keys_at_their_instant_and_not_before() {
        let mut config = pb::SiteConfig {
            segments: vec![pb::SegmentConfig {
                segment: "office".into(),
                peers: vec![peer("a", "a-new", 1_000), peer("b", "b-new", 2_000), peer("c", "c-new", 0)],
                ..Default::default()
            }],
            key_rotation: Some(pb::KeyRotation { id: 1, phase: pb::KeyPhase::Switch.into(), switch_at_unix_ms: 1_500 }),
            ..Default::default()
        };
        let keys = |c: &pb::SiteConfig| -> Vec<(String, String)> {
            c.segments[0].peers.iter().map(|p| (p.public_key.clone(), p.next_public_key.clone())).collect()
        };
        assert!(peers_switch(&config));
        let before = config.clone();
        assert_eq!(settle(&mut config, 999), Settled { ahead: Some(1_000 + PEER_LAG_MS), switched: vec![] });
        assert_eq!(config, before, "nothing before the first instant");
        assert!(!own_switch_due(&config, 999));

        let switched = vec![("mm-a".to_string(), "a-old".to_string(), "a-new".to_string())];
        assert_eq!(settle(&mut config, 1_000 + PEER_LAG_MS - 1).switched, vec![], "the site's handshake first");
        assert_eq!(
            settle(&mut config, 1_000 + PEER_LAG_MS),
            Settled { ahead: Some(1_500), switched },
            "the site's own instant next"
        );
        assert_eq!(keys(&config)[0], ("a-new".to_string(), String::new()), "a switched at its instant");
        assert_eq!(config.segments[0].peers[0].switch_at_unix_ms, 0);
        assert_eq!(keys(&config)[1], ("b-old".to_string(), "b-new".to_string()), "b not yet");

        assert!(own_switch_due(&config, 1_500));
        assert_eq!(settle(&mut config, 1_500).ahead, Some(2_000 + PEER_LAG_MS));
        assert_eq!(settle(&mut config, 2_500).switched.len(), 1, "b");
        assert_eq!(keys(&config)[1], ("b-new".to_string(), String::new()));
        assert_eq!(keys(&config)[2], ("c-old".to_string(), "c-new".to_string()), "prepare: held beside, not taken");
        assert!(!peers_switch(&config));
        let settled = config.clone();
        assert_eq!(settle(&mut config, 9_000), Settled::default(), "nothing ahead");
        assert_eq!(config, settled, "settling again changes nothing");

        // A switch without an instant (asked before instants existed) is due at once.
        config.key_rotation = Some(pb::KeyRotation { id: 2, phase: pb::KeyPhase::Switch.into(), switch_at_unix_ms: 0 });
        assert!(own_switch_due(&config, 0));
        config.key_rotation =
            Some(pb::KeyRotation { id: 2, phase: pb::KeyPhase::Prepare.into(), switch_at_unix_ms: 0 });
        assert!(!own_switch_due(&config, u64::MAX), "a prepare never switches");
    }
}
