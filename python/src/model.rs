//! `_native.Model`: a parallel model seen from Python. Every call hands a job to the model's
//! thread and waits for its answer with the GIL released.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArray2};
use parallelformers::checkpoint::source::ResolvedModel;
use parallelformers::text::TextSide;
use parallelformers::tokenizer::{Message, TextStream};
use parallelformers::{
    Backend, ExpertSplit, ForwardInput, GenerationConfig, ModelSource, Options, RankMemory, Result,
    WeightDType, WireTensor,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::actor::{Actor, Job, Started};
use crate::errors::{closed, invalid, to_py};
use crate::generation::{config_from, Generation};

/// A model split over worker processes.
#[pyclass(module = "parallelformers._native")]
pub struct Model {
    /// The model's thread; `None` once closed.
    actor: Mutex<Option<Actor>>,
    config: String,
    defaults: GenerationConfig,
    resolved: ResolvedModel,
    pids: Vec<u32>,
    memory: Vec<RankMemory>,
    /// The tokenizer and chat template, loaded on first use (here, not on the model's thread,
    /// so that a streaming generation's text can be decoded while it runs).
    text: OnceLock<Arc<TextSide>>,
}

impl Model {
    /// Hands `job` to the model's thread.
    fn send(&self, job: Job) -> PyResult<()> {
        let actor = self.actor.lock().map_err(|_| closed())?;
        match actor.as_ref().is_some_and(|actor| actor.send(job)) {
            true => Ok(()),
            false => Err(closed()),
        }
    }

    /// The tokenizer and chat template; a `ValueError` naming the model when it has none.
    fn text(&self, py: Python<'_>) -> PyResult<Arc<TextSide>> {
        if let Some(text) = self.text.get() {
            return Ok(text.clone());
        }
        let resolved = &self.resolved;
        let loaded = py.detach(|| TextSide::load(resolved)).map_err(to_py)?;
        let text = loaded.ok_or_else(|| {
            invalid(format!(
                "{} has no tokenizer: pass token ids instead of text",
                resolved.location.path().display()
            ))
        })?;
        Ok(self.text.get_or_init(|| Arc::new(text)).clone())
    }

    /// Sends the job `make(reply)` and waits, without the GIL, for its answer.
    fn ask<T: Send>(
        &self,
        py: Python<'_>,
        make: impl FnOnce(Sender<Result<T>>) -> Job,
    ) -> PyResult<T> {
        let (reply, answer) = channel();
        self.send(make(reply))?;
        py.detach(move || answer.recv())
            .map_err(|_| closed())?
            .map_err(to_py)
    }
}

/// The weight dtype called `name`.
fn dtype(name: &str) -> PyResult<WeightDType> {
    match name {
        "f32" | "float32" => Ok(WeightDType::F32),
        "f16" | "float16" => Ok(WeightDType::F16),
        "bf16" | "bfloat16" => Ok(WeightDType::Bf16),
        "quantized" => Ok(WeightDType::Quantized),
        other => Err(invalid(format!(
            "dtype must be \"f32\", \"f16\", \"bf16\" or \"quantized\", not {other:?}"
        ))),
    }
}

/// The backend called `name`.
fn backend(name: &str) -> PyResult<Backend> {
    match name {
        "shm" => Ok(Backend::Shm),
        "mpi" => Ok(Backend::Mpi),
        other => Err(invalid(format!(
            "backend must be \"shm\" or \"mpi\", not {other:?}"
        ))),
    }
}

/// The way of splitting a mixture of experts called `name`.
fn expert_split(name: &str) -> PyResult<ExpertSplit> {
    match name {
        "tensor" => Ok(ExpertSplit::Tensor),
        "expert" => Ok(ExpertSplit::Expert),
        other => Err(invalid(format!(
            "expert_split must be \"tensor\", \"expert\" or None, not {other:?}"
        ))),
    }
}

/// Token ids of a 2-D array, checked to fit the engine's `u32`.
fn ids(array: &PyReadonlyArray2<'_, i64>, what: &str) -> PyResult<(Vec<u32>, usize, usize)> {
    let view = array.as_array();
    let (rows, columns) = view.dim();
    let values = view
        .iter()
        .map(|&id| {
            u32::try_from(id).map_err(|_| invalid(format!("{what} holds {id}, not a token id")))
        })
        .collect::<PyResult<Vec<u32>>>()?;
    Ok((values, rows, columns))
}

/// A tensor as a NumPy array, moved (not copied element by element).
fn array(py: Python<'_>, tensor: WireTensor) -> PyResult<Bound<'_, PyArrayDyn<f32>>> {
    tensor.data.into_pyarray(py).reshape(tensor.shape)
}

#[pymethods]
impl Model {
    /// Resolves `source` (a checkpoint directory, a `.gguf` file, a Hub id, or `None` for the
    /// default model) and splits it over `ranks` worker processes started as `worker_command`
    /// (a program and its arguments).
    #[new]
    #[pyo3(signature = (source, ranks, dtype_name, policy, backend_name, seed, threads, worker_command, expert_split_name=None))]
    #[expect(
        clippy::too_many_arguments,
        reason = "the Python signature's keywords, one each"
    )]
    fn new(
        py: Python<'_>,
        source: Option<String>,
        ranks: usize,
        dtype_name: &str,
        policy: Option<PathBuf>,
        backend_name: &str,
        seed: Option<u64>,
        threads: Option<usize>,
        worker_command: Vec<String>,
        expert_split_name: Option<&str>,
    ) -> PyResult<Self> {
        if ranks == 0 {
            return Err(invalid("ranks must be at least 1"));
        }
        if threads == Some(0) {
            return Err(invalid("threads must be at least 1 (or None)"));
        }
        let (program, args) = worker_command
            .split_first()
            .ok_or_else(|| invalid("worker_command must name a program"))?;
        let options = Options {
            ranks,
            dtype: dtype(dtype_name)?,
            backend: backend(backend_name)?,
            seed,
            threads_per_rank: threads,
            worker_program: Some(PathBuf::from(program)),
            worker_args: args.to_vec(),
            policy,
            expert_split: expert_split_name.map(expert_split).transpose()?,
            ..Options::default()
        };
        let source = source.map_or(ModelSource::Default, ModelSource::from);
        let (actor, started) = py.detach(|| Actor::start(source, options)).map_err(to_py)?;
        let Started {
            config,
            defaults,
            resolved,
            pids,
            memory,
        } = started;
        Ok(Model {
            actor: Mutex::new(Some(actor)),
            config,
            defaults,
            resolved,
            pids,
            memory,
            text: OnceLock::new(),
        })
    }

    /// The resolved model configuration, as JSON.
    #[getter]
    fn config_json(&self) -> &str {
        &self.config
    }

    /// The checkpoint directory or GGUF file.
    #[getter]
    fn path(&self) -> String {
        self.resolved.location.path().display().to_string()
    }

    /// The ranks' process ids.
    #[getter]
    fn worker_pids(&self) -> Vec<u32> {
        self.pids.clone()
    }

    /// Each rank's memory once loaded, as the seed's `verbose` printed it: one line per rank
    /// (`"simple"`) or a breakdown per rank (`"detail"`).
    fn load_report(&self, verbose: &str) -> PyResult<Vec<String>> {
        match verbose {
            "simple" => Ok(self.memory.iter().map(|m| m.simple_line()).collect()),
            "detail" => Ok(self.memory.iter().map(|m| m.detail_lines()).collect()),
            other => Err(invalid(format!(
                "verbose must be None, \"simple\" or \"detail\", not {other:?}"
            ))),
        }
    }

    /// Whether the model was closed.
    #[getter]
    fn closed(&self) -> bool {
        self.actor.lock().map_or(true, |actor| actor.is_none())
    }

    /// The generation options after `kwargs` override the model's defaults, as a dict.
    #[pyo3(signature = (**kwargs))]
    fn generation_config<'py>(
        &self,
        py: Python<'py>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let config = config_from(&self.defaults, kwargs)?;
        let text = serde_json_text(&config)?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// A forward pass: logits `[B, L, V]` (or the last hidden state `[B, L, H]`) as float32.
    #[pyo3(signature = (input_ids, attention_mask=None, decoder_input_ids=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
        decoder_input_ids: Option<PyReadonlyArray2<'py, i64>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let (input_ids, batch, seq_len) = ids(&input_ids, "input_ids")?;
        let attention_mask = match attention_mask {
            Some(mask) => {
                let (mask, rows, columns) = ids(&mask, "attention_mask")?;
                if (rows, columns) != (batch, seq_len) {
                    return Err(invalid(format!(
                        "attention_mask has shape [{rows}, {columns}], input_ids [{batch}, {seq_len}]"
                    )));
                }
                Some(mask)
            }
            None => None,
        };
        let decoder_input_ids = match decoder_input_ids {
            Some(decoder) => {
                let (decoder, rows, _) = ids(&decoder, "decoder_input_ids")?;
                if rows != batch {
                    return Err(invalid(format!(
                        "decoder_input_ids has {rows} rows, input_ids {batch}"
                    )));
                }
                Some(decoder)
            }
            None => None,
        };
        let input = ForwardInput {
            input_ids,
            batch,
            seq_len,
            attention_mask,
            decoder_input_ids,
        };
        let tensor = self.ask(py, |reply| Job::Forward(input, reply))?;
        array(py, tensor)
    }

    /// Starts generating after `prompts` (token id lists of any lengths) with the model's
    /// defaults overridden by `kwargs`; returns the running generation.
    #[pyo3(signature = (prompts, **kwargs))]
    fn start_generation(
        &self,
        prompts: Vec<Vec<u32>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Generation> {
        if prompts.is_empty() {
            return Err(invalid("generate needs at least one prompt"));
        }
        let config = config_from(&self.defaults, kwargs)?;
        let (events, received) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job::Generate {
            prompts,
            config: Box::new(config),
            events,
            cancel: cancel.clone(),
        };
        self.send(job)?;
        Ok(Generation::new(received, cancel))
    }

    /// The token ids of `text` as the tokenizer encodes a prompt (special tokens added).
    fn encode(&self, py: Python<'_>, text: String) -> PyResult<Vec<u32>> {
        let side = self.text(py)?;
        py.detach(move || side.encode(&text)).map_err(to_py)
    }

    /// The text of token ids (special tokens left out).
    fn decode(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        let side = self.text(py)?;
        py.detach(move || side.decode(&ids)).map_err(to_py)
    }

    /// The token ids of `messages` (`(role, content)` pairs) through the model's chat
    /// template, ending with the assistant's turn.
    fn chat_prompt(&self, py: Python<'_>, messages: Vec<(String, String)>) -> PyResult<Vec<u32>> {
        let side = self.text(py)?;
        let messages: Vec<Message> = messages
            .iter()
            .map(|(role, content)| Message::new(role, content))
            .collect();
        py.detach(move || side.chat_prompt(&messages))
            .map_err(to_py)
    }

    /// An incremental decoder of generated ids: the text each new id makes final, as the
    /// server streams it (whole characters only, special tokens skipped).
    fn text_stream(&self, py: Python<'_>) -> PyResult<TextPieces> {
        Ok(TextPieces {
            side: self.text(py)?,
            stream: Mutex::new(TextStream::new()),
        })
    }

    /// Sentence embeddings `[len(texts), hidden]` of an encoder, pooled and normalised as its
    /// sentence-transformers files say.
    fn embed<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let inputs = texts
            .iter()
            .map(|text| self.encode(py, text.clone()))
            .collect::<PyResult<Vec<_>>>()?;
        if inputs.iter().all(Vec::is_empty) {
            return Err(invalid("embed needs at least one non-empty text"));
        }
        let tensor = self.ask(py, |reply| Job::Embed(inputs, reply))?;
        array(py, tensor)
    }

    /// Each rank's memory now, as JSON.
    fn memory_report(&self, py: Python<'_>) -> PyResult<String> {
        self.ask(py, Job::Memory)
    }

    /// Stops the ranks (after the job in progress) and frees everything; later calls raise.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let actor = self.actor.lock().map_err(|_| closed())?.take();
        py.detach(move || drop(actor));
        Ok(())
    }
}

/// Text pieces of a generation, as its ids arrive.
#[pyclass(module = "parallelformers._native")]
pub struct TextPieces {
    side: Arc<TextSide>,
    stream: Mutex<TextStream>,
}

#[pymethods]
impl TextPieces {
    /// Adds the next id; returns the text it made final (`None` while nothing new is).
    fn push(&self, id: u32) -> PyResult<Option<String>> {
        let mut stream = self.stream.lock().map_err(|_| closed())?;
        stream
            .push(&self.side.tokenizer, id)
            .map_err(|e| invalid(format!("cannot decode token {id}: {e}")))
    }

    /// The text still held back once the generation ended.
    fn finish(&self) -> PyResult<Option<String>> {
        let mut stream = self.stream.lock().map_err(|_| closed())?;
        stream
            .finish(&self.side.tokenizer)
            .map_err(|e| invalid(format!("cannot decode: {e}")))
    }
}

/// `config` as JSON text.
fn serde_json_text(config: &GenerationConfig) -> PyResult<String> {
    serde_json::to_string(config).map_err(|e| invalid(format!("cannot describe options: {e}")))
}
