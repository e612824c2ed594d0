//! Rebuild when the web client's files change: they are embedded in the binary, and a new
//! file in web/ is not a change Cargo sees on its own.
fn main() {
    println!("cargo:rerun-if-changed=web");
}
