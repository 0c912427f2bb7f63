//! The engine's errors as Python exceptions: bad arguments and unusable models raise
//! `ValueError` (files that cannot be read, `OSError`), failures of the ranks
//! `RankError`, anything else `ParallelformersError`, always with the engine's message.

use parallelformers::Error;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    parallelformers,
    ParallelformersError,
    PyException,
    "An error of the parallel model that is not a bad argument."
);
pyo3::create_exception!(
    parallelformers,
    RankError,
    ParallelformersError,
    "A rank (worker process) failed or stopped answering; the model must be restarted or closed."
);

/// Adds the exception classes to `module`.
pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add(
        "ParallelformersError",
        py.get_type::<ParallelformersError>(),
    )?;
    module.add("RankError", py.get_type::<RankError>())?;
    Ok(())
}

/// The Python exception of an engine error.
pub fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::InvalidInput(_)
        | Error::Config { .. }
        | Error::UnsupportedModel(_)
        | Error::TooManyRanks { .. }
        | Error::Checkpoint { .. }
        | Error::MissingTensor { .. }
        | Error::TensorShape { .. }
        | Error::Gguf(_)
        | Error::Tokenizer(_) => PyValueError::new_err(message),
        Error::Io { .. } => PyOSError::new_err(message),
        Error::Rank { .. } | Error::Comm(_) | Error::Launch(_) => RankError::new_err(message),
        _ => ParallelformersError::new_err(message),
    }
}

/// A `ValueError` with `message`.
pub fn invalid(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

/// The error of a model whose actor thread has ended (closed, or failed to start).
pub fn closed() -> PyErr {
    ParallelformersError::new_err(
        "the model was deparallelized (closed); parallelize it again to use it",
    )
}
