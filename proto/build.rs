fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/raft.proto",
        "proto/queue.proto",
        "proto/lease.proto",
        "proto/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // protoc comes from a crate, so a fresh clone builds with no system package.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure()
        .codec_path("crate::codec::SizedCodec")
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
