//! Harnesses for tests that run real processes: the Kafka-protocol broker, the
//! Schema Registry, QEMU and our own binaries.
//!
//! Every process a harness starts is owned by a guard that kills it (and waits
//! for it) on drop, so a failing test leaves nothing running. Heavy tests say
//! what they need in a `// Heavy: needs ...` comment and run with the rest of
//! the suite; `scripts/test.sh` installs their prerequisites first; when a prerequisite is missing they fail with a
//! message naming it rather than pass silently.

pub mod broker;
pub mod capture;
pub mod guest;
pub mod kv;
pub mod process;
pub mod qemu;
pub mod registry;

pub use process::{free_port, workspace_bin, ChildGuard, HarnessError};

use std::path::PathBuf;

/// Root of the workspace (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit crate lives one level below the workspace root")
        .to_path_buf()
}

/// vmreplay's cache directory (`$VMR_CACHE`, else `~/.cache/vmreplay`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMR_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("vmreplay")
}
