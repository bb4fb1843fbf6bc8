//! The Musubi site agent: enrols with the controller, keeps a Sync stream
//! open, and reconciles the router's datapath towards its site's
//! configuration (observe → plan → apply).

pub mod client;
pub mod datapath;
pub mod failover;
pub mod metrics;
pub mod probe;
pub mod reconcile;
pub mod simulate;
pub mod state;
pub mod summary;
pub mod trust;
