//! One module per subcommand. `replay` (and `instance`, `snapshot`) are gRPC
//! clients of the replayer and the capture agent.

pub mod completions;
pub mod doctor;
pub mod events;
pub mod image;
pub mod instance;
pub mod replay;
pub mod snapshot;
pub mod stack;
pub mod timeline;
