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

/// Which WireGuard an operator asks for (`--wireguard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireguardChoice {
    /// The kernel's when it has the module, else wireguard-go.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

/// How an operator asks segments to be kept apart (`--domains`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DomainChoice {
    /// VRFs when the kernel has them, else table mode.
    #[default]
    Auto,
    Vrf,
    Table,
}

impl WireguardChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            WireguardChoice::Auto => "auto",
            WireguardChoice::Kernel => "kernel",
            WireguardChoice::Userspace => "userspace",
        }
    }
}

impl DomainChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainChoice::Auto => "auto",
            DomainChoice::Vrf => "vrf",
            DomainChoice::Table => "table",
        }
    }
}

/// A choice by its name (`as_str`), or what the names are.
fn by_name<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str, s: &str) -> Result<T, String> {
    all.iter().copied().find(|c| name(*c) == s).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|c| name(*c)).collect();
        format!("`{s}`: expected {}", names.join(", "))
    })
}

impl std::str::FromStr for WireguardChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use WireguardChoice::*;
        by_name(&[Auto, Kernel, Userspace], Self::as_str, s)
    }
}

impl std::str::FromStr for DomainChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use DomainChoice::*;
        by_name(&[Auto, Vrf, Table], Self::as_str, s)
    }
}

impl Capabilities {
    /// The modes `auto` picks on this host, or why there is none.
    pub fn modes(&self) -> Result<(WireguardMode, DomainMode), String> {
        self.choose(WireguardChoice::Auto, DomainChoice::Auto)
    }

    /// The modes asked for, if this host has them; `auto` picks the kernel's
    /// WireGuard and VRFs where present. Pure: the capabilities are found
    /// first, by [`detect`].
    pub fn choose(&self, wg: WireguardChoice, domains: DomainChoice) -> Result<(WireguardMode, DomainMode), String> {
        let userspace = || {
            self.wireguard_go
                .clone()
                .map(WireguardMode::Userspace)
                .ok_or_else(|| "wireguard-go is not installed (apt-get install wireguard-go)".to_string())
        };
        let wg = match wg {
            WireguardChoice::Kernel if self.kernel_wireguard => WireguardMode::Kernel,
            WireguardChoice::Kernel => {
                return Err("kernel WireGuard asked for, but the kernel has no wireguard module \
                            (modprobe wireguard)"
                    .into());
            }
            WireguardChoice::Userspace => userspace()?,
            WireguardChoice::Auto if self.kernel_wireguard => WireguardMode::Kernel,
            WireguardChoice::Auto => {
                userspace().map_err(|e| format!("no WireGuard: the kernel has no wireguard module and {e}"))?
            }
        };
        let domains = match domains {
            DomainChoice::Vrf if !self.vrf => {
                return Err("VRFs asked for, but the kernel has no vrf module (modprobe vrf)".into());
            }
            DomainChoice::Vrf => DomainMode::Vrf,
            DomainChoice::Table => DomainMode::Table,
            DomainChoice::Auto if self.vrf => DomainMode::Vrf,
            DomainChoice::Auto => DomainMode::Table,
        };
        if let Err(e) = &self.nft {
            return Err(format!("no nftables: {e} (apt-get install nftables)"));
        }
        Ok((wg, domains))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host(kernel_wireguard: bool, vrf: bool, wireguard_go: bool) -> Capabilities {
        Capabilities {
            kernel_wireguard,
            vrf,
            wireguard_go: wireguard_go.then(|| PathBuf::from("/usr/bin/wireguard-go")),
            nft: Ok("nftables v1.0.6".into()),
            ipv4_forwarding: true,
            ipv6_forwarding: true,
        }
    }

    #[test]
    fn auto_picks_the_kernel_and_a_mode_asked_for_is_used_or_refused() {
        use DomainChoice as D;
        use WireguardChoice as W;
        let go = WireguardMode::Userspace("/usr/bin/wireguard-go".into());
        let full = host(true, true, true);
        assert_eq!(full.choose(W::Auto, D::Auto), Ok((WireguardMode::Kernel, DomainMode::Vrf)));
        assert_eq!(full.choose(W::Userspace, D::Table), Ok((go.clone(), DomainMode::Table)));
        assert_eq!(full.choose(W::Kernel, D::Table), Ok((WireguardMode::Kernel, DomainMode::Table)));
        let bare = host(false, false, true);
        assert_eq!(bare.choose(W::Auto, D::Auto), Ok((go, DomainMode::Table)));
        assert!(bare.choose(W::Kernel, D::Auto).is_err_and(|e| e.contains("no wireguard module")));
        assert!(bare.choose(W::Auto, D::Vrf).is_err_and(|e| e.contains("no vrf module")));
        assert!(host(false, true, false).choose(W::Auto, D::Auto).is_err_and(|e| e.contains("no WireGuard")));
        assert!("vrfs".parse::<DomainChoice>().is_err());
        assert_eq!("userspace".parse::<WireguardChoice>(), Ok(W::Userspace));
    }
}
