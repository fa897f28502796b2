//! The generated code under `src/gen/` is committed so that normal builds run no code generation. This test
//! regenerates it from `proto/*.proto` with protox (a pure-Rust protoc) and fails if the result differs, so the
//! two can never drift apart. Run with `KONNECTIVITY_BLESS=1` to rewrite the committed file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::PathBuf;

#[test]
fn generated_code_matches_proto_files() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = crate_dir.join("../../proto");
    let fds = protox::compile([proto_dir.join("client.proto"), proto_dir.join("agent.proto")], [&proto_dir])
        .expect("proto files compile");

    let out = tempdir();
    let mut config = tonic_prost_build::Config::new();
    config.default_package_filename("konnectivity");
    tonic_prost_build::configure()
        // tonic's transport helpers would generate `AgentServiceClient::connect(dst)`, which collides with
        // the `Connect` RPC; we build channels ourselves anyway.
        .build_transport(false)
        // Small initial buffers per stream (see src/codec.rs).
        .codec_path("crate::codec::PacketCodec")
        .bytes(".")
        .out_dir(&out)
        .compile_fds_with_config(fds, config)
        .expect("code generation");

    let fresh = std::fs::read_to_string(out.join("konnectivity.rs")).expect("generated file");
    let committed_path = crate_dir.join("src/gen/konnectivity.rs");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out);
    if fresh != committed {
        if std::env::var_os("KONNECTIVITY_BLESS").is_some() {
            std::fs::write(&committed_path, fresh).expect("write generated file");
            return;
        }
        panic!(
            "src/gen/konnectivity.rs is stale: run `KONNECTIVITY_BLESS=1 cargo test -p konnectivity-proto \
             --test regenerate` and commit the result"
        );
    }
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("konnectivity-proto-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}
