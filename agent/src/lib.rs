//! The Musubi site agent.

pub mod summary;
