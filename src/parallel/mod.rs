//! Tensor parallelism: the split arithmetic, building a rank's shard of a model (and forecasting
//! its memory), the worker process's life, the launcher that supervises the workers, and the
//! wire between them.

pub mod engine;
pub mod forecast;
pub mod ipc;
pub mod launcher;
pub mod memory;
pub mod meter;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod outbox;
pub mod process;
pub mod slicing;

pub use slicing::{Plan, Split};
