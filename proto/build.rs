//! Generates the ipc.v1 code with a vendored `protoc`, so a fresh machine needs no
//! system protoc, and writes the descriptor set that gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ipc_descriptor.bin"))
        .compile_with_config(
            config,
            &[PathBuf::from("ipc/v1/ipc.proto")],
            &[PathBuf::from("."), protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed=ipc/v1/ipc.proto");
    Ok(())
}
