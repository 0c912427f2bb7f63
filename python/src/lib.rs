//! `parallelformers._native`: the Rust engine as a Python extension module. The Python package
//! (`python/parallelformers/`) wraps it in the API users call; this module keeps to what needs
//! the engine: starting the ranks, forward passes, generation as a stream of events, the
//! tokenizer and chat template, embeddings, memory reports, and the rank processes' own entry
//! point.

mod actor;
mod errors;
mod generation;
mod model;

use pyo3::prelude::*;

/// Runs this process as a rank when the launcher started it as one (its environment says so),
/// then exits the process; returns at once otherwise. `python -m parallelformers._worker` calls
/// it, so that ranks start from the same interpreter and package, with no binary on `PATH`.
#[pyfunction]
fn worker_main() {
    parallelformers::run_worker_if_requested();
}

/// The extension module.
#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<model::Model>()?;
    module.add_class::<generation::Generation>()?;
    module.add_class::<model::TextPieces>()?;
    module.add_function(wrap_pyfunction!(worker_main, module)?)?;
    module.add("OPTION_NAMES", generation::OPTION_NAMES.to_vec())?;
    errors::register(module)?;
    Ok(())
}
