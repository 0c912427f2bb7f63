//! parallelformers: split a Hugging Face transformer over worker processes (Megatron-style
//! tensor parallelism) with one call, then run forward passes and generation on it.
//!
//! ```no_run
//! use parallelformers::{parallelize, GenerateParams, Options};
//!
//! fn main() -> parallelformers::Result<()> {
//!     // A program that starts ranks re-executes itself: let worker copies do their job.
//!     parallelformers::run_worker_if_requested();
//!     let mut model = parallelize("path/to/model", Options { ranks: 2, ..Options::default() })?;
//!     let out = model.generate(&[1, 2, 3], &GenerateParams::default())?;
//!     println!("{:?}", out.ids);
//!     Ok(())
//! }
//! ```
#![deny(missing_docs)]

pub mod api;
pub mod bandwidth;
pub mod checkpoint;
pub mod comm;
pub mod error;
pub mod generation;
pub mod models;
pub mod options;
pub mod parallel;
pub mod policy;
pub mod text;
pub mod tokenizer;

pub use api::{parallelize, GenerateParams, ParallelModel};
pub use checkpoint::source::ModelSource;
pub use error::{Error, Result};
pub use options::{Backend, Options, Verbosity, WeightDType};
pub use parallel::ipc::{ForwardInput, Generated, WireTensor};
pub use parallel::memory::RankMemory;
pub use parallel::process::run_worker_if_requested;
