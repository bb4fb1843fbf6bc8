//! Compiles proto/musubi/**/*.proto with the pure-Rust `protox` compiler (no
//! `protoc` needed) and generates prost messages, tonic services (feature `grpc`) and proto3-JSON serde impls.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["musubi/v1/site_config.proto", "musubi/v1/operator.proto", "musubi/v1/agent.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("musubi_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    // Services only with the `grpc` feature: without it the crate holds no
    // tonic code, so the pure core can use the messages.
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .codec_path("crate::codec::Lean")
        .compile_fds(fds)?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .build(&[".musubi"])?;
    Ok(())
}
