//! Musubi's pure core: data in, data out.
//!
//! The path of an intent: [`load`] reads YAML files ([`intent::parse`] keeps
//! every object's line and column), [`validate`] reports every problem at
//! once as a [`diagnostic::Diagnostic`], [`allocate`] gives segments and sites
//! their stable numbers, [`compile`] turns intent, allocations and agents'
//! public keys into one `SiteConfig` per site (whole, or only what a change
//! touches), [`plan`] diffs two states for the operator, [`verify`] proves the
//! reachability matrix and isolation, [`audit`] hashes the change chain, and
//! [`access`] judges who may change and read what.
//!
//! No clock, no network, no async runtime, no store: the only I/O is reading
//! intent files in [`load`]. The controller daemon, the operator CLI and the
//! lab runner build on it; a test keeps tokio, tonic, redb, etcd-client and
//! nix out of this crate's dependency tree.

pub mod access;
pub mod aid;
pub mod allocate;
pub mod api;
pub mod audit;
pub mod compile;
pub mod diagnostic;
pub mod generate;
pub mod intent;
pub mod load;
pub mod migration;
pub mod par;
pub mod plan;
pub mod rotation;
pub mod sorted;
pub mod validate;
pub mod verify;
pub mod words;
