//! Messages exchanged between the Musubi controller and its agents.
//!
//! Generated from `proto/musubi/**/*.proto` by prost, with proto3-JSON serde
//! implementations from pbjson (field names kept in snake_case).

#![allow(missing_debug_implementations)]

/// Version 1 of the Musubi protocol.
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/musubi.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/musubi.v1.serde.rs"));
}
