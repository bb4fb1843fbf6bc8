//! What the host offers (kernel WireGuard, VRFs, wireguard-go, nft,
//! forwarding), found by trying, and the modes that follow from it.

use std::path::PathBuf;

use super::runtime::{block_on, runtime};
use super::{netlink, nft};
use crate::datapath::DatapathError;

/// How WireGuard interfaces are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireguardMode {
    Kernel,
    /// `wireguard-go` at this path.
    Userspace(PathBuf),
}

/// How segments are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainMode {
    Vrf,
    Table,
}

/// What this host offers, found by trying.
#[derive(Debug, Clone)]
pub struct Capabilities {
    pub kernel_wireguard: bool,
    pub vrf: bool,
    pub wireguard_go: Option<PathBuf>,
    /// `nft --version`, or why it is unusable.
    pub nft: Result<String, String>,
    pub ipv4_forwarding: bool,
    pub ipv6_forwarding: bool,
}

impl Capabilities {
    /// The modes these capabilities give, or why there is none.
    pub fn modes(&self) -> Result<(WireguardMode, DomainMode), String> {
        let wg = if self.kernel_wireguard {
            WireguardMode::Kernel
        } else if let Some(p) = &self.wireguard_go {
            WireguardMode::Userspace(p.clone())
        } else {
            return Err("no WireGuard: the kernel has no wireguard module and wireguard-go is not installed \
                        (apt-get install wireguard-go)"
                .into());
        };
        if let Err(e) = &self.nft {
            return Err(format!("no nftables: {e} (apt-get install nftables)"));
        }
        Ok((wg, if self.vrf { DomainMode::Vrf } else { DomainMode::Table }))
    }
}

pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

pub(super) fn sysctl_on(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}

/// Tries the kernel's WireGuard and VRF by creating and deleting a probe
/// interface of each, and looks for `wireguard-go` and `nft`.
pub fn detect() -> Result<Capabilities, DatapathError> {
    let (rt, handle) = runtime()?;
    let (kernel_wireguard, vrf) = block_on(&rt, async {
        let probe = |name: &'static str| {
            let handle = handle.clone();
            async move {
                let idx = netlink::links(&handle).await.ok()?.into_iter().find(|l| l.name == name)?.index;
                netlink::delete_link(&handle, idx).await.ok()
            }
        };
        let wg = netlink::add_wireguard(&handle, "mw-probe0").await.is_ok();
        if wg {
            probe("mw-probe0").await;
        }
        let vrf = netlink::add_vrf(&handle, "mv-probe0", 0xfff0_0000).await.is_ok();
        if vrf {
            probe("mv-probe0").await;
        }
        (wg, vrf)
    })?;
    let nft = match std::process::Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => match nft::list() {
            Ok(_) => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
            Err(e) => Err(e.to_string()),
        },
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("nft: {e}")),
    };
    Ok(Capabilities {
        kernel_wireguard,
        vrf,
        wireguard_go: find_program("wireguard-go"),
        nft,
        ipv4_forwarding: sysctl_on("/proc/sys/net/ipv4/ip_forward"),
        ipv6_forwarding: sysctl_on("/proc/sys/net/ipv6/conf/all/forwarding"),
    })
}
