//! vmreplay's benchmarks: a synthetic vhost-user-blk frontend ([`frontend`])
//! and the workloads it drives ([`workload`]), used by the `vmr-bench-blk`
//! table and the `vmr-bench-blk-alloc` allocation count.

pub mod frontend;
pub mod workload;
