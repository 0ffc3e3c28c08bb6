//! Gives the shared library its SONAME, so programs linked against it load
//! `libaegis_ipc.so.0` (the ABI version), not whatever `libaegis_ipc.so` points at.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libaegis_ipc.so.0");
    }
}
