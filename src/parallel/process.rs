//! The life of a worker process (the seed's `ParallelProcess`): read its environment, pin itself
//! to its cores, join the rendezvous and the communicator, load only its own slices (telling the
//! launcher how far it has got a few times a second), report "parallelized" with its memory,
//! then serve requests until told to stop.
//!
//! A worker is our own binary re-executed with `PARALLELFORMERS_RANK` set. Any program that
//! calls [`parallelize`](crate::parallelize) with itself as the worker program must call
//! [`run_worker_if_requested`] first thing in `main`.

use std::cell::RefCell;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::comm::{Communicator, Heartbeat, ShmCommunicator, SingleRank};
use crate::error::{Error, Result};
use crate::generation::constraint::Grammars;
use crate::generation::prefix_cache::{PrefixCache, PrefixCacheReport};
use crate::generation::session::{self, Control, EndReason, SessionLink};
use crate::generation::{self, Hooks, TokenLogprobs};
use crate::models::{self, Batch, ShardedModel};
use crate::options::{ExpertSplit, PrefillChunk};
use crate::parallel::engine::{ShardLoader, WeightBytes};
use crate::parallel::ipc::{
    read_frame, write_frame, ForwardInput, LoadSpec, Reply, Request, WireTensor,
};
use crate::parallel::launcher::HEARTBEAT_INTERVAL;
use crate::parallel::memory::{ExpertsHeld, RankMemory};
use crate::parallel::meter::{LoadMeter, LoadReport};
use crate::parallel::slicing::Plan;
use crate::policy::Policy;

/// How long a rank on cores of its own spins in a collective before sleeping: longer than the
/// load imbalance of a decode step, so decoding never pays a wake-up latency.
const DEDICATED_SPIN_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// Environment variable names a worker reads; the launcher sets them.
pub mod env {
    /// This worker's rank (its presence makes a process a worker).
    pub const RANK: &str = "PARALLELFORMERS_RANK";
    /// Rank among the workers on this host.
    pub const LOCAL_RANK: &str = "PARALLELFORMERS_LOCAL_RANK";
    /// Number of ranks.
    pub const WORLD_SIZE: &str = "PARALLELFORMERS_WORLD_SIZE";
    /// Path of the launcher's Unix socket.
    pub const RENDEZVOUS: &str = "PARALLELFORMERS_RENDEZVOUS";
    /// The run's secret, sent back in the handshake.
    pub const SECRET: &str = "PARALLELFORMERS_SECRET";
    /// Inherited descriptor of the shared-memory region.
    pub const COMM_FD: &str = "PARALLELFORMERS_COMM_FD";
    /// Compute threads for this rank.
    pub const THREADS: &str = "PARALLELFORMERS_THREADS";
    /// Comma-separated CPUs to pin to (empty: no pinning).
    pub const CPUS: &str = "PARALLELFORMERS_CPUS";
}

/// If this process was started as a worker, runs the worker and exits; otherwise returns at
/// once. Call it first thing in `main` of any program used as a worker program.
pub fn run_worker_if_requested() {
    if std::env::var_os(env::RANK).is_none() {
        return;
    }
    let code = match run_worker() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("parallelformers worker: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// What a worker learns from its environment.
#[derive(Debug, Clone)]
struct WorkerEnv {
    rank: usize,
    local_rank: usize,
    world_size: usize,
    rendezvous: PathBuf,
    secret: String,
    comm_fd: Option<i32>,
    cpus: Vec<usize>,
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| Error::Launch(format!("worker environment lacks {name}")))
}

fn number(name: &str) -> Result<usize> {
    var(name)?.parse().map_err(|_| {
        Error::Launch(format!(
            "worker environment variable {name} is not a number"
        ))
    })
}

impl WorkerEnv {
    fn from_env() -> Result<Self> {
        let cpus = var(env::CPUS).unwrap_or_default();
        Ok(WorkerEnv {
            rank: number(env::RANK)?,
            local_rank: number(env::LOCAL_RANK)?,
            world_size: number(env::WORLD_SIZE)?,
            rendezvous: PathBuf::from(var(env::RENDEZVOUS)?),
            secret: var(env::SECRET)?,
            comm_fd: number(env::COMM_FD).ok().map(|fd| fd as i32),
            cpus: cpus.split(',').filter_map(|c| c.parse().ok()).collect(),
        })
    }
}

/// Restricts this process to `cpus` (best effort: where the OS refuses, it runs unpinned).
pub(crate) fn pin_to(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside `set`, and
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                "could not pin to CPUs {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A loaded shard and what it needs to serve requests.
struct Shard {
    model: Box<dyn ShardedModel>,
    comm: Box<dyn Communicator>,
    weights: WeightBytes,
    /// The whole experts this rank holds (expert parallelism).
    experts: Option<ExpertsHeld>,
    /// How many prompt tokens a session prefills with each decode step.
    prefill_chunk: PrefillChunk,
    /// Keys and values of earlier sequences, kept between requests.
    prefix: PrefixCache,
    /// Compiles the constraints of requests (on rank 0, which chooses the tokens).
    grammars: Grammars,
}

fn run_worker() -> Result<()> {
    let env = WorkerEnv::from_env()?;
    pin_to(&env.cpus);
    if let Some(fd) = env.comm_fd {
        start_heartbeat(Heartbeat::attach(fd, env.rank, env.world_size)?);
    }
    tracing::debug!(
        rank = env.rank,
        local_rank = env.local_rank,
        "worker starting"
    );
    let stream = UnixStream::connect(&env.rendezvous).map_err(|e| {
        Error::Launch(format!(
            "rank {} cannot reach the launcher at {}: {e}",
            env.rank,
            env.rendezvous.display()
        ))
    })?;
    let comm = CommSource::Shm {
        fd: env.comm_fd,
        dedicated: !env.cpus.is_empty(),
    };
    serve(stream, env.rank, env.world_size, &env.secret, comm)
}

/// Where a worker's communicator comes from.
pub enum CommSource {
    /// The launcher's shared-memory region, inherited as descriptor `fd` (none with one rank);
    /// `dedicated`: the rank is pinned to cores of its own.
    Shm {
        /// The region's descriptor.
        fd: Option<i32>,
        /// Pinned to cores of its own: waiting may spin longer.
        dedicated: bool,
    },
    /// A communicator made by the caller (MPI).
    Given(Box<dyn Communicator>),
}

impl CommSource {
    fn open(self, rank: usize, world_size: usize) -> Result<Box<dyn Communicator>> {
        Ok(match (world_size, self) {
            (_, CommSource::Given(comm)) => comm,
            (1, CommSource::Shm { .. }) => Box::new(SingleRank),
            (
                _,
                CommSource::Shm {
                    fd: Some(fd),
                    dedicated,
                },
            ) => {
                let mut comm = ShmCommunicator::attach(fd, rank, world_size)?;
                if dedicated {
                    // Pinned to cores of its own: spinning costs nobody anything.
                    comm.set_spin_window(DEDICATED_SPIN_WINDOW);
                }
                Box::new(comm)
            }
            (_, CommSource::Shm { fd: None, .. }) => {
                return Err(Error::Launch(format!(
                    "{} is required with several ranks",
                    env::COMM_FD
                )))
            }
        })
    }
}

/// Serves the launcher at the other end of `stream` as rank `rank` of `world_size`: the
/// handshake with `secret`, the load request, then every request until the launcher shuts the
/// group down or goes away.
pub fn serve(
    mut stream: UnixStream,
    rank: usize,
    world_size: usize,
    secret: &str,
    comm: CommSource,
) -> Result<()> {
    let send = |stream: &mut UnixStream, reply: &Reply| {
        write_frame(stream, reply).map_err(|e| Error::Launch(format!("lost the launcher: {e}")))
    };
    send(
        &mut stream,
        &Reply::Hello {
            rank,
            secret: secret.to_string(),
        },
    )?;
    let spec = match read_frame::<Request>(&mut stream) {
        Ok(Request::Load(spec)) => spec,
        Ok(Request::Shutdown) => return Ok(()),
        // The launcher is gone.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => {
            return Err(Error::Launch(format!(
                "rank {rank} cannot read its load request: {e}"
            )))
        }
        Ok(other) => {
            return Err(Error::Launch(format!(
                "expected a load request first, got {other:?}"
            )))
        }
    };
    let mut report = |done, total| send(&mut stream, &Reply::Loading { rank, done, total });
    let loaded = comm
        .open(rank, world_size)
        .and_then(|comm| load_shard(rank, world_size, comm, &spec, &mut report));
    let mut shard = match loaded {
        Ok(shard) => shard,
        Err(e) => {
            send(&mut stream, &Reply::Error(e.to_string()))?;
            return Err(e);
        }
    };
    send(&mut stream, &Reply::Parallelized(memory(rank, &mut shard)))?;
    loop {
        let request = match read_frame::<Request>(&mut stream) {
            Ok(request) => request,
            // The launcher is gone: nothing left to serve.
            Err(_) => return Ok(()),
        };
        let reply = match request {
            Request::Shutdown => return Ok(()),
            Request::Load(_) => Reply::Error("the shard is already loaded".into()),
            Request::Memory => Reply::Memory(memory(rank, &mut shard)),
            Request::Forward(req) => answer(rank, forward(&mut shard, &req)),
            Request::Generate(req) => {
                let link = RefCell::new(&mut stream);
                let mut on_token = |row: usize, token: u32| {
                    let token = Reply::Token {
                        row: row as u32,
                        token,
                    };
                    send(&mut link.borrow_mut(), &token)
                };
                let mut finish_requested = || finish_requests(&mut link.borrow_mut());
                let hooks = Hooks {
                    on_token: &mut on_token,
                    finish_requested: &mut finish_requested,
                };
                let model = shard.model.as_mut();
                match generation::generate(
                    model,
                    shard.comm.as_ref(),
                    &req,
                    &mut shard.prefix,
                    &shard.grammars,
                    hooks,
                ) {
                    Ok(generated) => Reply::Generated(generated),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
            Request::Session(initial) => {
                let mut link = RankZeroLink {
                    stream: &mut stream,
                };
                let link = (rank == 0).then_some(&mut link as &mut dyn SessionLink);
                let (model, comm) = (shard.model.as_mut(), shard.comm.as_ref());
                let (chunk, grammars) = (shard.prefill_chunk, &shard.grammars);
                match session::run(
                    model,
                    comm,
                    initial,
                    chunk,
                    &mut shard.prefix,
                    grammars,
                    link,
                ) {
                    Ok(summary) => Reply::SessionEnded(summary),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
            // Control messages that arrived after their generation or session ended: nothing
            // to do.
            Request::Finish(_) | Request::Join(_) | Request::EndSession => continue,
        };
        send(&mut stream, &reply)?;
    }
}

fn lost_launcher(e: std::io::Error) -> Error {
    Error::Launch(format!("lost the launcher: {e}"))
}

/// The control messages waiting on rank 0's socket (with `wait`, at least one: blocks until
/// one arrives).
fn control_messages(stream: &mut UnixStream, wait: bool) -> Result<Vec<Request>> {
    let mut messages = Vec::new();
    loop {
        let mut waiting = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(stream),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = if wait && messages.is_empty() { -1 } else { 0 };
        // SAFETY: one valid pollfd for a socket this process owns.
        let ready = unsafe { libc::poll(&mut waiting, 1, timeout) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(lost_launcher(error));
        }
        if ready == 0 || waiting.revents == 0 {
            return Ok(messages);
        }
        messages.push(read_frame::<Request>(stream).map_err(lost_launcher)?);
    }
}

/// The rows the main process asked rank 0 to finish since the last check.
fn finish_requests(stream: &mut UnixStream) -> Result<Vec<usize>> {
    let mut rows = Vec::new();
    for message in control_messages(stream, false)? {
        match message {
            Request::Finish(finished) => rows.extend(finished.into_iter().map(|r| r as usize)),
            other => {
                return Err(Error::Launch(format!(
                    "unexpected request while generating: {other:?}"
                )))
            }
        }
    }
    Ok(rows)
}

/// Rank 0's socket during a session.
struct RankZeroLink<'a> {
    stream: &'a mut UnixStream,
}

impl SessionLink for RankZeroLink<'_> {
    fn token(&mut self, id: u32, token: u32) -> Result<()> {
        let reply = Reply::Token { row: id, token };
        write_frame(self.stream, &reply).map_err(lost_launcher)
    }

    fn logprobs(&mut self, id: u32, logprobs: &TokenLogprobs) -> Result<()> {
        let reply = Reply::Logprobs {
            row: id,
            logprobs: logprobs.clone(),
        };
        write_frame(self.stream, &reply).map_err(lost_launcher)
    }

    fn ended(&mut self, id: u32, reason: &EndReason) -> Result<()> {
        let reply = Reply::Ended {
            id,
            reason: reason.clone(),
        };
        write_frame(self.stream, &reply).map_err(lost_launcher)
    }

    fn idle(&mut self) -> Result<()> {
        write_frame(self.stream, &Reply::Idle).map_err(lost_launcher)
    }

    fn prefix_cache(&mut self, report: &PrefixCacheReport) -> Result<()> {
        write_frame(self.stream, &Reply::PrefixCache(*report)).map_err(lost_launcher)
    }

    fn controls(&mut self, wait: bool) -> Result<Vec<Control>> {
        control_messages(self.stream, wait)?
            .into_iter()
            .map(|message| match message {
                Request::Join(sequences) => Ok(Control::Join(sequences)),
                Request::Finish(ids) => Ok(Control::Finish(ids)),
                Request::EndSession => Ok(Control::End),
                other => Err(Error::Launch(format!(
                    "unexpected request during a session: {other:?}"
                ))),
            })
            .collect()
    }
}

/// Beats every [`HEARTBEAT_INTERVAL`] from a thread of its own for as long as the process runs,
/// so that the launcher can tell a busy rank from a stopped one.
fn start_heartbeat(heartbeat: Heartbeat) {
    std::thread::spawn(move || loop {
        heartbeat.beat();
        std::thread::sleep(HEARTBEAT_INTERVAL);
    });
}

/// Rank 0 returns the payload; the others only say whether they succeeded.
fn answer(rank: usize, result: Result<Reply>) -> Reply {
    match result {
        Ok(reply) if rank == 0 => reply,
        Ok(_) => Reply::Done,
        Err(e) => Reply::Error(e.to_string()),
    }
}

fn memory(rank: usize, shard: &mut Shard) -> RankMemory {
    let kv_cache_bytes = shard.model.kv_cache_bytes() as u64;
    RankMemory::measure(rank, shard.weights, kv_cache_bytes, shard.experts)
}

/// Loads rank `rank`'s shard as `spec` says, telling `report` how far it has got
/// ([`Reply::Loading`]).
fn load_shard(
    rank: usize,
    world_size: usize,
    comm: Box<dyn Communicator>,
    spec: &LoadSpec,
    report: LoadReport<'_>,
) -> Result<Shard> {
    let weights = spec.location.open(&spec.config)?;
    let plan = Plan::new(&spec.config, world_size)?;
    let policy = spec
        .policy
        .clone()
        .unwrap_or_else(|| Policy::for_config(&spec.config));
    let mut loader = ShardLoader::new(weights.as_ref(), &policy, &plan, rank, spec.dtype)
        .metered(LoadMeter::start(weights.as_ref(), report)?);
    let model = models::load(&mut loader, &spec.config)?;
    loader.finish()?;
    let weights = loader.bytes();
    let experts = (policy.expert_split() == ExpertSplit::Expert)
        .then(|| ExpertsHeld::of_rank(&plan.experts, rank));
    tracing::debug!(rank, "shard loaded");
    comm.barrier()?;
    let prefix = PrefixCache::new(
        spec.prefill.prefix_cache_bytes,
        plan.kv_bytes_per_position(&spec.config),
    );
    Ok(Shard {
        model,
        comm,
        weights,
        experts,
        prefill_chunk: spec.prefill.chunk,
        prefix,
        grammars: Grammars::of_model(&spec.location, spec.config.vocab_size),
    })
}

fn forward(shard: &mut Shard, req: &ForwardInput) -> Result<Reply> {
    shard.model.clear_cache();
    let batch = Batch {
        ids: &req.input_ids,
        batch: req.batch,
        seq_len: req.seq_len,
        attention_mask: req.attention_mask.as_deref(),
        use_cache: false,
        last_only: false,
        positions: None,
        decoder_ids: req.decoder_input_ids.as_deref(),
    };
    let out = shard.model.forward(&batch, shard.comm.as_ref())?;
    if shard.comm.rank() != 0 {
        // Only rank 0 answers with the output.
        return Ok(Reply::Done);
    }
    Ok(Reply::Forward(WireTensor {
        shape: out.dims().to_vec(),
        data: out.flatten_all()?.to_vec1()?,
    }))
}
