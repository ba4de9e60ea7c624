//! gRPC service that restores clones from snapshots and replays recorded inputs
