//! Compiles `axial/v1/*.proto` with protox (pure Rust, no protoc on the machine).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=axial");
    let fds = protox::compile(["axial/v1/coordinator.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
