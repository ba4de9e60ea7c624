fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/vmr/v1/event.proto",
        "proto/vmr/v1/snapshot.proto",
        "proto/vmr/v1/agent.proto",
        "proto/vmr/v1/replayer.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
