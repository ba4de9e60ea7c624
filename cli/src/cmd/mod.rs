//! One module per subcommand. The service subcommands (`instance`,
//! `snapshot`, `replay`) will sit beside these as gRPC clients of the agent
//! and the replayer.

pub mod completions;
pub mod doctor;
pub mod events;
pub mod image;
pub mod stack;
