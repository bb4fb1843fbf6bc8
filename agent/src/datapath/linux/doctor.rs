//! `musubi-agent doctor`: the host's capabilities and the modes chosen, with
//! advice, as text for a person.

use super::capabilities::{Capabilities, DomainChoice, DomainMode, WireguardChoice, WireguardMode};

impl Capabilities {
    /// A report for `musubi-agent doctor`: what `auto` picks.
    pub fn report(&self) -> String {
        self.report_for(WireguardChoice::Auto, DomainChoice::Auto)
    }

    /// A report for `musubi-agent doctor --wireguard … --domains …`: what
    /// those choices give on this host, and why.
    pub fn report_for(&self, wg: WireguardChoice, domains: DomainChoice) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let mut out = String::new();
        out.push_str(&format!("kernel WireGuard: {}\n", yes(self.kernel_wireguard)));
        out.push_str(&format!(
            "wireguard-go:     {}\n",
            self.wireguard_go.as_ref().map_or("not found".to_string(), |p| p.display().to_string())
        ));
        out.push_str(&format!("VRF:              {}\n", yes(self.vrf)));
        out.push_str(&format!(
            "nftables:         {}\n",
            match &self.nft {
                Ok(v) => v.clone(),
                Err(e) => format!("unusable: {e}"),
            }
        ));
        out.push_str(&format!(
            "forwarding:       IPv4 {}, IPv6 {}\n",
            yes(self.ipv4_forwarding),
            yes(self.ipv6_forwarding)
        ));
        out.push_str(&format!("asked:            --wireguard {} --domains {}\n", wg.as_str(), domains.as_str()));
        match self.choose(wg, domains) {
            Ok((wg, domain)) => {
                out.push_str(&format!(
                    "mode:             {} WireGuard, {}\n",
                    if wg == WireguardMode::Kernel { "kernel" } else { "userspace (wireguard-go)" },
                    if domain == DomainMode::Vrf {
                        "one VRF per segment"
                    } else {
                        "table mode (a routing table and rules per segment)"
                    }
                ));
                if wg != WireguardMode::Kernel {
                    out.push_str(
                        "advice:           kernel WireGuard is faster; load it with `modprobe wireguard` \
                         (Debian kernels ship it)\n",
                    );
                }
                if domain == DomainMode::Table {
                    out.push_str(
                        "advice:           VRFs isolate sockets on the router too; `modprobe vrf` \
                         (Debian kernels ship it)\n",
                    );
                }
                if !self.ipv4_forwarding || !self.ipv6_forwarding {
                    out.push_str("advice:           the agent turns forwarding on when it starts\n");
                }
            }
            Err(e) => out.push_str(&format!("mode:             none: {e}\n")),
        }
        out
    }
}
