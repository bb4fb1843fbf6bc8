//! The agent service as the controller serves it: the generated routes,
//! except that a Sync stream's messages go out as [`Outgoing::framed`]'s
//! pieces — a configuration as the very bytes the fan-out keeps.
//!
//! tonic's own response body encodes each message into a buffer of its
//! call: a configuration's bytes copied in, and the buffer kept, and grown,
//! for the stream's life (10 KB per connected agent at 2,000 sites, in a
//! heap profile). Here a message is a small head, made for it and freed once
//! sent, and the configuration's shared bytes; nothing is kept between
//! messages. The agent reads the same gRPC stream either way.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use musubi_proto::codec::Lean;
use musubi_proto::v1 as pb;
use musubi_proto::wire::Outgoing;
use musubi_proto::wire::agent_server::{Agent, AgentServer, SERVICE_NAME};
use prost::bytes::Bytes;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::codec::Codec;
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};

use super::agent::AgentService;
use crate::store::IntentStore;

/// Whether `path` is the Sync method's: `/<service>/Sync`, the service's
/// name as the generated server has it (a path this misses would still be
/// answered, by the generated route, without the shared bytes).
fn is_sync(path: &str) -> bool {
    path.strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE_NAME)) == Some("/Sync")
}

/// The agent service's routes: Sync answered here, the others by the
/// generated server.
#[derive(Debug)]
pub struct AgentRoutes<S> {
    generated: AgentServer<AgentService<S>>,
    service: AgentService<S>,
    max_decoding: usize,
}

// Not derived: that would ask `S: Clone`.
impl<S> Clone for AgentRoutes<S> {
    fn clone(&self) -> Self {
        AgentRoutes {
            generated: self.generated.clone(),
            service: self.service.clone(),
            max_decoding: self.max_decoding,
        }
    }
}

impl<S: IntentStore + 'static> AgentRoutes<S> {
    /// `max_decoding`: the largest message an agent may send.
    pub fn new(service: AgentService<S>, max_decoding: usize) -> Self {
        let generated = AgentServer::new(service.clone())
            .max_decoding_message_size(max_decoding)
            .max_encoding_message_size(usize::MAX);
        AgentRoutes { generated, service, max_decoding }
    }
}

impl<S> NamedService for AgentRoutes<S> {
    const NAME: &'static str = SERVICE_NAME;
}

impl<S: IntentStore + 'static> tower_service::Service<http::Request<Body>> for AgentRoutes<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !is_sync(request.uri().path()) {
            return Box::pin(self.generated.call(request));
        }
        let service = self.service.clone();
        let max = self.max_decoding;
        Box::pin(async move { Ok(sync(service, request, max).await) })
    }
}

/// A Sync call: the agent's messages decoded as tonic would, the answer
/// streamed as [`Framed`].
async fn sync<S: IntentStore + 'static>(
    service: AgentService<S>,
    request: http::Request<Body>,
    max_decoding: usize,
) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    // Agents send uncompressed messages; a compressed one ends the stream
    // with an error from the decoder.
    let decoder = Lean::<Outgoing, pb::AgentMessage>::default().decoder();
    let inbound = Streaming::new_request(decoder, body, None, Some(max_decoding));
    match service.sync(Request::from_http(http::Request::from_parts(parts, inbound))).await {
        Err(status) => status.into_http(),
        Ok(response) => {
            let (metadata, messages, extensions) = response.into_parts();
            let mut answer = http::Response::new(Body::new(Framed::new(messages)));
            *answer.headers_mut() = metadata.into_headers();
            *answer.extensions_mut() = extensions;
            answer.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            answer
        }
    }
}

/// A gRPC response body of [`Outgoing`] messages, each sent as its head and
/// then its configuration's shared bytes; the stream's end or error as the
/// trailers (`grpc-status`).
#[derive(Debug)]
pub struct Framed<M> {
    messages: M,
    /// The configuration's bytes of the message whose head went last.
    rest: Option<Bytes>,
    ended: bool,
}

impl<M> Framed<M> {
    pub fn new(messages: M) -> Self {
        Framed { messages, rest: None, ended: false }
    }
}

impl<M: Stream<Item = Result<Outgoing, Status>> + Unpin> http_body::Body for Framed<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(rest) = self.rest.take() {
            return Poll::Ready(Some(Ok(Frame::data(rest))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(Pin::new(&mut self.messages).poll_next(cx)) {
            Some(Ok(message)) => match message.framed() {
                Some((head, rest)) => {
                    self.rest = (!rest.is_empty()).then_some(rest);
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                None => Status::resource_exhausted("a message of 4 GiB or more cannot be sent"),
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(status.add_header(&mut trailers).map(|()| Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.rest.is_none()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use prost::Message;

    use super::*;

    fn config(revision: u64, site: &str) -> Outgoing {
        let kept = pb::SiteConfig { site: site.into(), tenant: "pref".into(), ..Default::default() };
        Outgoing::Config { revision, digest: format!("d{revision}"), config: kept.encode_to_vec().into() }
    }

    /// The body's frames: data pieces and the trailers.
    async fn frames(messages: Vec<Result<Outgoing, Status>>) -> (Vec<Bytes>, http::HeaderMap) {
        let mut body = Framed::new(tokio_stream::iter(messages));
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("no body error");
            assert!(trailers.is_none(), "nothing after the trailers");
            match frame.into_data() {
                Ok(d) => data.push(d),
                Err(f) => trailers = Some(f.into_trailers().expect("trailers")),
            }
        }
        assert!(http_body::Body::is_end_stream(&body));
        (data, trailers.expect("the stream ends with trailers"))
    }

    /// Splits a gRPC body into its messages, as an agent reads them.
    fn messages(data: &[Bytes]) -> Vec<pb::ControllerMessage> {
        let all: Vec<u8> = data.concat();
        let mut at = &all[..];
        let mut read = Vec::new();
        while !at.is_empty() {
            assert_eq!(at[0], 0, "uncompressed");
            let len = u32::from_be_bytes([at[1], at[2], at[3], at[4]]) as usize;
            read.push(pb::ControllerMessage::decode(&at[5..5 + len]).expect("a controller message"));
            at = &at[5 + len..];
        }
        read
    }

    #[test]
    fn only_the_sync_method_is_answered_here() {
        assert!(is_sync("/musubi.v1.Agent/Sync"));
        assert!(!is_sync("/musubi.v1.Agent/Enrol"));
        assert!(!is_sync("/musubi.v1.Agent/Sync/more"));
        assert!(!is_sync("/other.Agent/Sync"));
    }

    #[tokio::test]
    async fn messages_go_out_as_a_grpc_stream_with_the_configuration_bytes_shared() {
        let sent = [config(7, "site-a"), Outgoing::Keepalive(pb::Keepalive { unix_ms: 5 }), config(8, "site-a")];
        let (data, trailers) = frames(sent.iter().cloned().map(Ok).collect()).await;
        assert_eq!(data.len(), 5, "a head and the configuration each, a keepalive in one");
        let want: Vec<pb::ControllerMessage> = sent
            .iter()
            .map(|m| pb::ControllerMessage::decode(m.encode_to_vec().as_slice()).expect("decodes"))
            .collect();
        assert_eq!(messages(&data), want);
        let Outgoing::Config { config: first, .. } = &sent[0] else { unreachable!() };
        assert_eq!(data[1].as_ptr(), first.as_ptr(), "the fan-out's bytes, not a copy");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_with_its_status_in_the_trailers() {
        let ended = Status::permission_denied("site `site-a` is revoked");
        let (data, trailers) = frames(vec![Ok(config(3, "site-a")), Err(ended), Ok(config(4, "site-a"))]).await;
        assert_eq!(messages(&data).len(), 1, "nothing after the error");
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "site `site-a` is revoked");
    }
}
