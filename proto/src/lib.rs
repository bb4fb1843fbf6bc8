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
