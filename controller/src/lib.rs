//! The Musubi controller's pure core and its operator CLI.
//!
//! Everything under [`intent`], [`validate`], [`allocate`], [`compile`] and
//! [`plan`] is pure: data in, data out, no clock, no files, no network. Reading
//! files lives in [`load`] and the binaries.

pub mod allocate;
pub mod api;
pub mod audit;
pub mod compile;
pub mod diagnostic;
pub mod fanout;
pub mod generate;
pub mod intent;
pub mod load;
pub mod par;
pub mod pki;
pub mod plan;
pub mod server;
pub mod sites;
pub mod sorted;
pub mod store;
pub mod validate;
pub mod verify;
