//! The core stays pure by construction, not by convention: no async runtime,
//! gRPC, store, system-call wrapper or allocator may enter the dependency
//! tree of `musubi-core`. Asked of cargo itself, so a new dependency that
//! pulls one in transitively fails here.

use std::collections::BTreeSet;
use std::process::Command;

const FORBIDDEN: &[&str] =
    &["tokio", "tonic", "tonic-prost", "hyper", "redb", "etcd-client", "nix", "tikv-jemallocator", "rtnetlink"];

fn tree(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--locked", "--offline", "-p", package, "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn core_has_no_runtime_store_or_socket_in_its_tree() {
    let core = tree("musubi-core");
    assert!(core.contains("musubi-proto"), "the tree was not read: {core:?}");
    let found: Vec<_> = FORBIDDEN.iter().filter(|c| core.contains(**c)).collect();
    assert!(found.is_empty(), "musubi-core depends on {found:?}; keep I/O in the controller, the CLI or the lab");
}

/// The check itself can fail: the controller, which serves gRPC over tokio
/// from a store, has them.
#[test]
fn the_controller_has_what_the_core_must_not() {
    let controller = tree("musubi-controller");
    for c in ["tokio", "tonic", "redb", "etcd-client"] {
        assert!(controller.contains(c), "{c} missing from the controller's tree: the check reads the wrong tree");
    }
}
