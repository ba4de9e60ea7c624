//! Per-host agent that runs recorded instances, produces their events and snapshots them
