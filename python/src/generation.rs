//! Generation from Python: keyword options with transformers' names over the model's
//! defaults, and a running generation as a stream of events that Python polls with the GIL
//! released (so that Ctrl-C and other threads get their turn between polls).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parallelformers::{EarlyStopping, GenerationConfig};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::actor::Event;
use crate::errors::{invalid, to_py};

/// The options of transformers' `generate` that the engine takes, by name.
pub const OPTION_NAMES: &[&str] = &[
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "min_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "max_time",
    "bad_words_ids",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "eos_token_id",
    "pad_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "renormalize_logits",
    "stop_strings",
    "seed",
];

/// `defaults` with the options of `kwargs` (transformers' names; `None` values leave the
/// default). An unknown name or a value of the wrong type is a `ValueError` naming it.
pub fn config_from(
    defaults: &GenerationConfig,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<GenerationConfig> {
    let mut config = defaults.clone();
    let Some(kwargs) = kwargs else {
        return Ok(config);
    };
    for (key, value) in kwargs.iter() {
        let name: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        let wrong = |e: PyErr| invalid(format!("generation option {name}={value}: {e}"));
        match name.as_str() {
            "max_new_tokens" => config.max_new_tokens = value.extract().map_err(wrong)?,
            "min_new_tokens" => config.min_new_tokens = value.extract().map_err(wrong)?,
            "do_sample" => config.do_sample = value.extract().map_err(wrong)?,
            "temperature" => config.temperature = value.extract().map_err(wrong)?,
            "top_k" => config.top_k = value.extract().map_err(wrong)?,
            "top_p" => config.top_p = value.extract().map_err(wrong)?,
            "typical_p" => config.typical_p = value.extract().map_err(wrong)?,
            "min_p" => config.min_p = Some(value.extract().map_err(wrong)?),
            "encoder_repetition_penalty" => {
                config.encoder_repetition_penalty = value.extract().map_err(wrong)?
            }
            "encoder_no_repeat_ngram_size" => {
                config.encoder_no_repeat_ngram_size = value.extract().map_err(wrong)?
            }
            "max_time" => config.max_time = Some(value.extract().map_err(wrong)?),
            "epsilon_cutoff" => config.epsilon_cutoff = value.extract().map_err(wrong)?,
            "eta_cutoff" => config.eta_cutoff = value.extract().map_err(wrong)?,
            "bad_words_ids" => config.bad_words_ids = value.extract().map_err(wrong)?,
            "sequence_bias" => config.sequence_bias = sequence_bias(&value).map_err(wrong)?,
            "exponential_decay_length_penalty" => {
                let (start, factor) = pair(&value).map_err(wrong)?;
                config.exponential_decay_length_penalty = Some((
                    start.extract().map_err(wrong)?,
                    factor.extract().map_err(wrong)?,
                ));
            }
            "repetition_penalty" => config.repetition_penalty = value.extract().map_err(wrong)?,
            "no_repeat_ngram_size" => {
                config.no_repeat_ngram_size = value.extract().map_err(wrong)?
            }
            "num_beams" => config.num_beams = value.extract().map_err(wrong)?,
            "length_penalty" => config.length_penalty = value.extract().map_err(wrong)?,
            "early_stopping" => config.early_stopping = early_stopping(&value).map_err(wrong)?,
            "num_return_sequences" => {
                config.num_return_sequences = value.extract().map_err(wrong)?
            }
            "eos_token_id" => config.eos_token_id = Some(one_or_many(&value).map_err(wrong)?),
            "pad_token_id" => config.pad_token_id = Some(value.extract().map_err(wrong)?),
            "forced_bos_token_id" => {
                config.forced_bos_token_id = Some(value.extract().map_err(wrong)?)
            }
            "forced_eos_token_id" => {
                config.forced_eos_token_id = Some(one_or_many(&value).map_err(wrong)?)
            }
            "suppress_tokens" => config.suppress_tokens = value.extract().map_err(wrong)?,
            "begin_suppress_tokens" => {
                config.begin_suppress_tokens = value.extract().map_err(wrong)?
            }
            "renormalize_logits" => config.renormalize_logits = value.extract().map_err(wrong)?,
            "stop_strings" => config.stop = one_or_many(&value).map_err(wrong)?,
            "seed" => config.seed = Some(value.extract().map_err(wrong)?),
            other => {
                return Err(invalid(format!(
                    "unknown generation option {other:?}; the options are {}",
                    OPTION_NAMES.join(", ")
                )))
            }
        }
    }
    Ok(config)
}

/// `early_stopping`: `True`, `False` or `"never"`.
fn early_stopping(value: &Bound<'_, PyAny>) -> PyResult<EarlyStopping> {
    if let Ok(flag) = value.extract::<bool>() {
        return Ok(match flag {
            true => EarlyStopping::Done,
            false => EarlyStopping::Heuristic,
        });
    }
    let word: String = value.extract()?;
    word.parse().map_err(invalid)
}

/// `sequence_bias`: a list of `[token ids, bias]` pairs, or a dict from tuples of token ids
/// to biases (transformers takes both).
fn sequence_bias(value: &Bound<'_, PyAny>) -> PyResult<Vec<(Vec<u32>, f32)>> {
    if let Ok(dict) = value.cast::<PyDict>() {
        return dict
            .iter()
            .map(|(ids, bias)| Ok((ids.extract()?, bias.extract()?)))
            .collect();
    }
    let pairs: Vec<Bound<'_, PyAny>> = value.extract()?;
    pairs
        .iter()
        .map(|p| {
            let (ids, bias) = pair(p)?;
            Ok((ids.extract()?, bias.extract()?))
        })
        .collect()
}

/// The two items of a list or tuple of two.
fn pair<'py>(value: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let items: Vec<Bound<'py, PyAny>> = value.extract()?;
    match <[_; 2]>::try_from(items) {
        Ok([a, b]) => Ok((a, b)),
        Err(items) => Err(invalid(format!("expected two items, got {}", items.len()))),
    }
}

/// One value or a list of them.
fn one_or_many<'py, T: for<'a> FromPyObjectOwned<'py>>(
    value: &Bound<'py, PyAny>,
) -> PyResult<Vec<T>> {
    match value.extract::<T>() {
        Ok(one) => Ok(vec![one]),
        Err(_) => value.extract(),
    }
}

/// A running generation: its tokens as they are chosen, then its result.
#[pyclass(module = "parallelformers._native")]
pub struct Generation {
    events: Mutex<Option<Receiver<Event>>>,
    cancel: Arc<AtomicBool>,
}

impl Generation {
    /// The generation whose events arrive on `events`, stopped early through `cancel`.
    pub fn new(events: Receiver<Event>, cancel: Arc<AtomicBool>) -> Self {
        Generation {
            events: Mutex::new(Some(events)),
            cancel,
        }
    }
}

#[pymethods]
impl Generation {
    /// The next event, waiting at most `timeout` seconds (`None` when none came):
    /// `("token", row, token_id)`, or `("done", sequences, scores, stats)` once it ended, with
    /// each row's new tokens, the beam scores (or `None`) and a dict of timings. Raises the
    /// generation's error; after `"done"`, returns `None`.
    fn next_event<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        // Never wait for the lock: its holder waits without the GIL and needs it back.
        let mut guard = self
            .events
            .try_lock()
            .map_err(|_| invalid("another thread is reading this generation"))?;
        let Some(events) = guard.take() else {
            return Ok(None);
        };
        let wait = Duration::from_secs_f64(timeout.max(0.0));
        let (events, event) = py.detach(move || {
            let event = events.recv_timeout(wait);
            (events, event)
        });
        *guard = Some(events);
        let event = match event {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => return Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                *guard = None;
                return Err(crate::errors::closed());
            }
        };
        match event {
            Event::Token(row, token) => Ok(Some(PyTuple::new(
                py,
                [
                    "token".into_pyobject(py)?.into_any(),
                    row.into_pyobject(py)?.into_any(),
                    token.into_pyobject(py)?.into_any(),
                ],
            )?)),
            Event::Done(result) => {
                *guard = None;
                let batch = result.map_err(to_py)?;
                let stats = PyDict::new(py);
                stats.set_item("prefill_seconds", batch.prefill_seconds)?;
                stats.set_item("decode_seconds", batch.decode_seconds)?;
                stats.set_item("overhead_seconds", batch.overhead_seconds)?;
                stats.set_item("cached_prompt_tokens", batch.cached_prompt_tokens)?;
                Ok(Some(PyTuple::new(
                    py,
                    [
                        "done".into_pyobject(py)?.into_any(),
                        PyList::new(py, &batch.sequences)?.into_any(),
                        batch.scores.into_pyobject(py)?.into_any(),
                        stats.into_any(),
                    ],
                )?))
            }
        }
    }

    /// Whether the generation has ended (its `"done"` event was read, or the model closed).
    #[getter]
    fn finished(&self) -> bool {
        self.events.try_lock().is_ok_and(|events| events.is_none())
    }

    /// Asks the ranks to stop at their next step; the events go on until `"done"`, whose
    /// sequences hold the tokens chosen so far.
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Generation {
    /// A generation nobody reads any more stops.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
