//! The gRPC services of `musubi-controller`: the operator API and the
//! agent API, and who may call them.

pub mod agent;
pub mod framed;
pub mod operator;

use tonic::{Request, Status};

use crate::pki::{self, Identity};

/// The authenticated caller of an operator call, for the audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// When the caller's operator certificate was issued (Unix ms): a
/// revocation refuses certificates issued before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issued(pub u64);

/// Checks operator calls: with mutual TLS only an operator certificate may
/// call (its name becomes the actor); without TLS the actor is `local`.
pub fn operator_auth(mtls: bool) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync {
    move |mut request: Request<()>| {
        let actor = if mtls {
            let peer = request.peer_certs().and_then(|certs| certs.first().and_then(|c| pki::peer(c)));
            match peer.map(|p| (p.identity, p.issued_ms)) {
                Some((Identity::Operator(name), issued_ms)) => {
                    request.extensions_mut().insert(Issued(issued_ms));
                    format!("operator:{name}")
                }
                Some((Identity::Site(site), _)) => {
                    tracing::warn!(site, "refused an operator call made with a site certificate");
                    return Err(Status::permission_denied("a site certificate cannot use the operator API"));
                }
                None => {
                    return Err(Status::unauthenticated(
                        "the operator API needs an operator certificate (musubi --cert/--key, from musubi-controller init)",
                    ));
                }
            }
        } else {
            "local".to_string()
        };
        request.extensions_mut().insert(Actor(actor));
        Ok(request)
    }
}
