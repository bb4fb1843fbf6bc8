//! What the agent tells the controller: the Hello that opens a stream, and
//! the status reports (applied revision, per-peer health, active paths).

use musubi_proto::v1 as pb;

use super::Agent;
use super::settings::{AgentError, VERSION, now_ms};
use crate::failover::machine::Moved;
use crate::probe::Key;

impl Agent {
    /// The local line of a peer's active path (its first, if the agent does
    /// not pick it).
    fn local_line(&self, segment: &str, peer: &str) -> String {
        if let Some((local, _)) = self.machine.active().paths.get(peer) {
            return local.clone();
        }
        self.config()
            .and_then(|c| c.segments.iter().find(|s| s.segment == segment))
            .and_then(|s| s.peers.iter().find(|p| p.name == peer))
            .and_then(|p| p.endpoints.first())
            .map(|e| e.local_line.clone())
            .unwrap_or_default()
    }

    /// The path a peer is reached over, `local→remote`, when the agent picks it.
    fn path_of(&self, peer: &str) -> String {
        self.machine.active().paths.get(peer).map(|(l, r)| format!("{l}→{r}")).unwrap_or_default()
    }

    /// Times the line to `peer` moved since the agent started.
    fn line_moves(&self, peer: &str) -> u64 {
        self.machine.moves().get(&Moved::Line { peer: peer.to_string() }).copied().unwrap_or(0)
    }

    /// Times a route group moved since the agent started.
    fn group_moves(&self, segment: &str, group: &str) -> u64 {
        let key = Moved::Group { segment: segment.to_string(), group: group.to_string() };
        self.machine.moves().get(&key).copied().unwrap_or(0)
    }

    pub(super) fn status(&self, keys: Vec<pb::InterfaceKey>) -> pb::AgentMessage {
        let (applied_revision, applied_digest) =
            self.applied.as_ref().map_or((0, String::new()), |a| (a.revision, a.digest.clone()));
        let peers = self
            .applied
            .as_ref()
            .and_then(|a| a.config.as_ref())
            .map(|c| {
                c.segments
                    .iter()
                    .flat_map(|s| {
                        // A peer without a key yet has no tunnel to report.
                        s.peers.iter().filter(|p| !p.public_key.is_empty()).map(|p| match &self.prober {
                            Some(prober) => {
                                let h = prober.get(&Key::tunnel(&s.segment, &p.name));
                                let judged = h.is_some();
                                let h = h.unwrap_or_default();
                                pb::PeerHealth {
                                    segment: s.segment.clone(),
                                    peer: p.name.clone(),
                                    up: h.up,
                                    rtt_us: h.rtt_us,
                                    loss_permille: h.loss_permille,
                                    path: self.path_of(&p.name),
                                    judged,
                                    line_moves: self.line_moves(&p.name),
                                }
                            }
                            // Not probed: a configured peer counts as up.
                            None => pb::PeerHealth {
                                segment: s.segment.clone(),
                                peer: p.name.clone(),
                                up: true,
                                judged: true,
                                ..Default::default()
                            },
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        pb::AgentMessage {
            body: Some(pb::agent_message::Body::Status(pb::Status {
                applied_revision,
                applied_digest,
                peers,
                active: self
                    .machine
                    .active()
                    .groups
                    .iter()
                    .map(|((segment, group), peer)| pb::ActivePath {
                        segment: segment.clone(),
                        route_group: group.clone(),
                        peer: peer.clone(),
                        local_line: self.local_line(segment, peer),
                        moves: self.group_moves(segment, group),
                    })
                    .collect(),
                errors: self.errors.clone(),
                keys,
                at_unix_ms: now_ms(),
                configs_received: self.configs_received,
                datapath_writes: self.datapath.writes(),
                // The controller condenses what it stores; the agent reports all.
                peers_up_omitted: 0,
                active_omitted: 0,
                peers_unjudged_omitted: 0,
                next_keys: self.next_keys.clone(),
                aids_in_use: self
                    .config()
                    .map(|c| crate::failover::aids_in_use(c, self.machine.active()).into_iter().collect())
                    .unwrap_or_default(),
            })),
        }
    }

    pub(super) fn hello(&self) -> Result<pb::AgentMessage, AgentError> {
        let keys = self
            .settings
            .state
            .public_keys()?
            .into_iter()
            .map(|(segment, public_key)| pb::InterfaceKey { interface: String::new(), segment, public_key })
            .collect();
        let (applied_revision, applied_digest) =
            self.applied.as_ref().map_or((0, String::new()), |a| (a.revision, a.digest.clone()));
        Ok(pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                site: self.settings.site.clone(),
                agent_version: VERSION.to_string(),
                keys,
                applied_revision,
                applied_digest,
                next_keys: self.next_keys.clone(),
            })),
        })
    }
}
