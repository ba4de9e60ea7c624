//! The encoded `FileDescriptorSet` of `vmr.v1.Replayer` (with its imports)
//! for the gRPC reflection service, written by `protoc` from the shared
//! `.proto` files.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../proto/proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"))
        .join("replayer_descriptor.bin");
    for f in ["vmr/v1/replayer.proto", "vmr/v1/event.proto"] {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    let status = Command::new(&protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg(format!("-I{}", root.display()))
        .arg("vmr/v1/replayer.proto")
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {protoc:?} (install protobuf-compiler or set PROTOC): {e}")
        });
    assert!(status.success(), "protoc failed on vmr/v1/replayer.proto");
}
