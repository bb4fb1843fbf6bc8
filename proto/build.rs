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

    // The Agent service once more, as the controller serves it: same
    // routes and messages, but its stream carries `crate::wire::Outgoing`
    // (a ControllerMessage on the wire whose configuration is written from
    // bytes the controller keeps).
    if grpc {
        let method = |name: &str, route: &str, input: &str, output: &str| {
            tonic_build::manual::Method::builder()
                .name(name)
                .route_name(route)
                .input_type(input)
                .output_type(output)
                .codec_path("crate::codec::Lean")
        };
        let agent = tonic_build::manual::Service::builder()
            .name("Agent")
            .package("musubi.v1")
            .method(method("enroll", "Enroll", "crate::v1::EnrollRequest", "crate::v1::EnrollResponse").build())
            .method(method("renew", "Renew", "crate::v1::RenewRequest", "crate::v1::EnrollResponse").build())
            .method(
                method("sync", "Sync", "crate::v1::AgentMessage", "crate::wire::Outgoing")
                    .client_streaming()
                    .server_streaming()
                    .build(),
            )
            .build();
        tonic_build::manual::Builder::new().build_client(false).build_transport(false).compile(&[agent]);
    }

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .build(&[".musubi"])?;
    Ok(())
}
