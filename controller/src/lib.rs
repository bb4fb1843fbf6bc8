//! The Musubi controller daemon: the intent store (etcd or embedded), the
//! fan-out that compiles and streams each site's configuration, the agent and
//! operator gRPC servers, and the PKI. The pure work — parsing, validation,
//! allocation, compilation, plans — is `musubi_core`'s.

pub mod aid;
pub mod approvals;
pub mod dashboard;
pub mod fanout;
pub mod metrics;
pub mod pki;
pub mod rotation;
pub mod server;
pub mod signing;
pub mod sites;
pub mod store;
