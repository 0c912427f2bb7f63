//! parallelformers: split a Hugging Face transformer over worker processes (Megatron-style
//! tensor parallelism) with one call, then run forward passes and generation on it.
//!
//! ```no_run
//! use parallelformers::{parallelize, Options};
//!
//! fn main() -> parallelformers::Result<()> {
//!     // A program that starts ranks re-executes itself: let worker copies do their job.
//!     parallelformers::run_worker_if_requested();
//!     let mut model = parallelize("path/to/model", Options { ranks: 2, ..Options::default() })?;
//!     // The checkpoint's generation defaults, changed for this request.
//!     let mut config = model.generation_config().clone();
//!     config.do_sample = true;
//!     config.temperature = 0.7;
//!     config.max_new_tokens = 32;
//!     let out = model.generate(&[1, 2, 3], &config)?;
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
pub mod progress;
pub mod serve;
pub mod text;
pub mod tokenizer;

pub use api::{parallelize, Generated, ParallelModel};
pub use checkpoint::source::ModelSource;
pub use error::{Error, Result};
pub use generation::{EarlyStopping, GeneratedBatch, GenerationConfig, TokenLogprobs};
pub use options::{
    Backend, ExpertSplit, Options, PrefillChunk, PrefillOptions, Verbosity, WeightDType,
};
pub use parallel::ipc::{ForwardInput, WireTensor};
pub use parallel::memory::RankMemory;
pub use parallel::process::run_worker_if_requested;
pub use progress::{Progress, ProgressSink};
