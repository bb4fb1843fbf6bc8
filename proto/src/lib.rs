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

    impl Status {
        /// Peers up, those a stored record only counts included.
        pub fn peers_up(&self) -> usize {
            self.peers.iter().filter(|p| p.up).count() + self.peers_up_omitted as usize
        }

        /// Every peer, those a stored record only counts included.
        pub fn peers_total(&self) -> usize {
            self.peers.len() + (self.peers_up_omitted as usize) + (self.peers_unjudged_omitted as usize)
        }
    }
}

#[cfg(feature = "grpc")]
/// The gRPC codec of every Musubi service: prost, with small per-call buffers.
///
/// tonic's default codec gives every call an 8 KiB encode and an 8 KiB decode
/// buffer up front; a controller holds one Sync call per site, so at 10,000
/// sites that is 160 MiB of buffers that mostly carry keepalives and small
/// status reports. Here each call starts at 512 bytes and grows to the
/// largest message it carries.
pub mod codec {
    use std::marker::PhantomData;

    use prost::Message;
    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Initial buffer of a call, each way.
    pub const BUFFER: usize = 512;
    /// tonic's default: encoded messages are handed on once this many bytes wait.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// prost encoding with [`BUFFER`]-sized initial buffers.
    #[derive(Debug, Clone)]
    pub struct Lean<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Lean<T, U> {
        fn default() -> Self {
            Lean(PhantomData)
        }
    }

    impl<T, U> Codec for Lean<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
        }
    }
}

#[cfg(feature = "grpc")]
/// What the controller sends on an agent's stream, with each configuration
/// as the bytes the fan-out already holds.
///
/// On the wire an [`Outgoing`] is a [`v1::ControllerMessage`]: an agent
/// decodes it as one. The configuration's bytes are written as they are,
/// preceded by its revision (protobuf reads fields in any order), so a
/// configuration the fan-out keeps encoded is neither decoded nor encoded
/// again for each agent it goes to — and, sent as [`Outgoing::framed`]'s
/// pieces, not copied either.
pub mod wire {
    use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
    use prost::encoding::{self, DecodeContext, WireType};

    use crate::v1;

    /// `ControllerMessage.config`, `ConfigUpdate.revision`, `.digest` and `.config`.
    const BODY_CONFIG: u32 = 1;
    const BODY_KEEPALIVE: u32 = 2;
    const UPDATE_REVISION: u32 = 1;
    const UPDATE_DIGEST: u32 = 2;
    const UPDATE_CONFIG: u32 = 3;
    /// `SiteConfig.revision`.
    const CONFIG_REVISION: u32 = 5;

    /// A [`v1::ControllerMessage`] as the controller writes it.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Outgoing {
        /// A `ConfigUpdate` whose `SiteConfig` is `config` (encoded, its own
        /// revision left unset) with `revision` set.
        Config {
            revision: u64,
            digest: String,
            config: Bytes,
        },
        Keepalive(v1::Keepalive),
    }

    impl Default for Outgoing {
        fn default() -> Self {
            Outgoing::Keepalive(v1::Keepalive::default())
        }
    }

    fn revision_len(revision: u64) -> usize {
        if revision == 0 { 0 } else { encoding::uint64::encoded_len(CONFIG_REVISION, &revision) }
    }

    /// The `SiteConfig`'s length on the wire, its revision included.
    fn config_len(revision: u64, config: &Bytes) -> usize {
        config.len() + revision_len(revision)
    }

    fn update_len(revision: u64, digest: &String, config: &Bytes) -> usize {
        let inner = config_len(revision, config);
        (if revision == 0 { 0 } else { encoding::uint64::encoded_len(UPDATE_REVISION, &revision) })
            + (if digest.is_empty() { 0 } else { encoding::string::encoded_len(UPDATE_DIGEST, digest) })
            + encoding::key_len(UPDATE_CONFIG)
            + encoding::encoded_len_varint(inner as u64)
            + inner
    }

    impl Outgoing {
        /// Everything before the configuration's bytes (the whole message
        /// for a keepalive): the `ConfigUpdate`'s revision and digest, the
        /// `SiteConfig`'s length and its revision (written before the
        /// configuration's fields: protobuf reads fields in any order).
        fn encode_head(&self, buf: &mut impl BufMut) {
            match self {
                Outgoing::Config { revision, digest, config } => {
                    encoding::encode_key(BODY_CONFIG, WireType::LengthDelimited, buf);
                    encoding::encode_varint(update_len(*revision, digest, config) as u64, buf);
                    if *revision != 0 {
                        encoding::uint64::encode(UPDATE_REVISION, revision, buf);
                    }
                    if !digest.is_empty() {
                        encoding::string::encode(UPDATE_DIGEST, digest, buf);
                    }
                    encoding::encode_key(UPDATE_CONFIG, WireType::LengthDelimited, buf);
                    encoding::encode_varint(config_len(*revision, config) as u64, buf);
                    if *revision != 0 {
                        encoding::uint64::encode(CONFIG_REVISION, revision, buf);
                    }
                }
                Outgoing::Keepalive(k) => encoding::message::encode(BODY_KEEPALIVE, k, buf),
            }
        }

        /// The message as a gRPC stream carries it, in two pieces: the
        /// five-byte prefix (uncompressed, the length) with everything
        /// before the configuration's bytes, then those bytes — the
        /// fan-out's own, shared, not copied (empty for a keepalive).
        /// `None` for a message of 4 GiB or more, which gRPC cannot frame.
        pub fn framed(&self) -> Option<(Bytes, Bytes)> {
            let len = u32::try_from(prost::Message::encoded_len(self)).ok()?;
            let rest = match self {
                Outgoing::Config { config, .. } => config.clone(),
                Outgoing::Keepalive(_) => Bytes::new(),
            };
            let mut head = BytesMut::with_capacity(5 + len as usize - rest.len());
            head.put_u8(0);
            head.put_u32(len);
            self.encode_head(&mut head);
            Some((head.freeze(), rest))
        }
    }

    impl prost::Message for Outgoing {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            self.encode_head(buf);
            if let Outgoing::Config { config, .. } = self {
                buf.put_slice(config);
            }
        }

        /// Never read by this process (agents read a `ControllerMessage`):
        /// every field is skipped.
        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl Buf,
            ctx: DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            match self {
                Outgoing::Config { revision, digest, config } => {
                    let inner = update_len(*revision, digest, config);
                    encoding::key_len(BODY_CONFIG) + encoding::encoded_len_varint(inner as u64) + inner
                }
                Outgoing::Keepalive(k) => encoding::message::encoded_len(BODY_KEEPALIVE, k),
            }
        }

        fn clear(&mut self) {
            *self = Outgoing::default();
        }
    }

    #[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
    mod generated {
        include!(concat!(env!("OUT_DIR"), "/musubi.v1.Agent.rs"));
    }

    /// The `musubi.v1.Agent` service as the controller serves it: the
    /// generated one's routes and messages, [`Outgoing`] on the stream.
    pub use generated::agent_server;

    #[cfg(test)]
    mod tests {
        use prost::Message;

        use super::*;

        fn config(revision: u64) -> v1::SiteConfig {
            // Fields on both sides of the revision's tag (5).
            v1::SiteConfig {
                site: "site-a".into(),
                tenant: "pref".into(),
                revision,
                lines: vec![v1::Line { name: "fiber".into(), ..Default::default() }],
                probe: Some(v1::ProbeSettings { interval_ms: 300, ..Default::default() }),
                ..Default::default()
            }
        }

        #[test]
        fn an_outgoing_configuration_is_the_controller_message_an_agent_decodes() {
            for revision in [0, 1, 300, u64::MAX] {
                let kept = Bytes::from(config(0).encode_to_vec());
                let out = Outgoing::Config { revision, digest: "ab12".into(), config: kept };
                let bytes = out.encode_to_vec();
                assert_eq!(bytes.len(), out.encoded_len(), "revision {revision}");
                let read = v1::ControllerMessage::decode(bytes.as_slice()).expect("decodes");
                let want = v1::ControllerMessage {
                    body: Some(v1::controller_message::Body::Config(v1::ConfigUpdate {
                        revision,
                        digest: "ab12".into(),
                        config: Some(config(revision)),
                    })),
                };
                assert_eq!(read, want, "revision {revision}");
                // Framed for gRPC: the prefix says uncompressed and the
                // length; the configuration's bytes are the fan-out's own.
                let (head, rest) = out.framed().expect("frames");
                assert_eq!(head[0], 0, "not compressed");
                assert_eq!(u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize, bytes.len());
                assert_eq!([&head[5..], &rest[..]].concat(), bytes, "revision {revision}");
                let Outgoing::Config { config, .. } = &out else { unreachable!() };
                assert_eq!(rest.as_ptr(), config.as_ptr(), "shared, not copied");
            }
            let keepalive = Outgoing::Keepalive(v1::Keepalive { unix_ms: 17 });
            let read = v1::ControllerMessage::decode(keepalive.encode_to_vec().as_slice()).expect("decodes");
            assert_eq!(read.body, Some(v1::controller_message::Body::Keepalive(v1::Keepalive { unix_ms: 17 })));
            let (head, rest) = keepalive.framed().expect("frames");
            assert!(rest.is_empty());
            assert_eq!(&head[5..], keepalive.encode_to_vec().as_slice());
            assert_eq!(head.len(), 5 + keepalive.encoded_len());
        }
    }
}
