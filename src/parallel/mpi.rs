//! Ranks started by `mpirun` (cargo feature `mpi`): every MPI rank is one tensor-parallel rank.
//!
//! MPI rank 0 is the front: it runs the caller (CLI, HTTP server) and the launcher, and serves
//! tensor-parallel rank 0 from a thread of its own. The other MPI ranks serve the launcher
//! through a tunnel: a thread on each side carries the launcher's frames between a local Unix
//! socket and MPI messages, so that the launcher and the workers speak exactly the protocol
//! they speak on one host. The collectives run over an MPI communicator of their own
//! ([`MpiCommunicator`]). Two kinds of traffic in several threads at once need
//! `MPI_THREAD_MULTIPLE`, which [`MpiJob::join`] requires.
//!
//! A rank that dies ends the MPI job: `mpirun` stops the others and exits non-zero, naming it.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mpi::environment::Universe;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, Destination, Root, Source};
use mpi::Threading;

use crate::comm::mpi::{MpiCommunicator, SharedComm};
use crate::error::{Error, Result};
use crate::parallel::launcher::WorkerGroup;
use crate::parallel::process::{serve, CommSource};

/// The tag of tunnel messages; an empty message closes the tunnel.
const TUNNEL: i32 = 7;
/// The largest piece of a frame one tunnel message carries (below the TCP transport's eager
/// limit). A send larger than a transport's eager limit waits for the peer's receive; that never
/// deadlocks the two tunnel threads, because the protocol never sends both ways at once: the
/// launcher sends a rank a request only while the rank is idle, and the rank answers after it.
const PIECE_BYTES: usize = 32 * 1024;
/// How long an idle tunnel first sleeps between looks at its two ends; the sleep doubles while
/// nothing passes, up to [`TUNNEL_IDLE_MAX`] (a tunnel shares its process's cores with rank 0's
/// compute thread, which it must not keep waking).
const TUNNEL_IDLE: Duration = Duration::from_micros(50);
/// The longest sleep of an idle tunnel: what it adds at most to a request's way to a rank.
const TUNNEL_IDLE_MAX: Duration = Duration::from_millis(2);
/// Length of the launcher's secret (hexadecimal digits), broadcast to every rank.
const SECRET_LEN: usize = 32;

/// This process's place in the MPI job.
pub struct MpiJob {
    universe: Universe,
    /// The tunnels' communicator.
    control: Arc<SharedComm>,
    /// The collectives' communicator, until the rank's worker takes it.
    collectives: SimpleCommunicator,
    rank: usize,
    size: usize,
}

impl MpiJob {
    /// Initialises MPI (with `MPI_THREAD_MULTIPLE`) in this process, which `mpirun` started.
    /// Compute threads follow the CPUs MPI bound the rank to, unless `RAYON_NUM_THREADS` says.
    pub fn join() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| {
                Error::Launch(
                    "MPI is already initialised in this process: one model per MPI job".into(),
                )
            })?;
        if threading != Threading::Multiple {
            return Err(Error::Launch(format!(
                "the MPI library provides {threading:?} threading; parallelformers needs MPI_THREAD_MULTIPLE"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let threads = super::launcher::default_threads(1).to_string();
            std::env::set_var("RAYON_NUM_THREADS", &threads);
            std::env::set_var("CANDLE_NUM_THREADS", &threads);
        }
        Ok(MpiJob {
            control: Arc::new(SharedComm(world.duplicate())),
            collectives: world.duplicate(),
            universe,
            rank,
            size,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the launcher's group, whose rank 0 is a thread of this process and whose other
    /// ranks are the other MPI ranks, each reached through a tunnel.
    pub fn front(self, startup_timeout: Duration) -> Result<(WorkerGroup, MpiFinalizer)> {
        let MpiJob {
            universe,
            control,
            collectives,
            size,
            ..
        } = self;
        let mut collectives = Some(collectives);
        let group = WorkerGroup::adopt(size, startup_timeout, |socket, secret| {
            share_secret(&control, secret);
            let connect = || {
                UnixStream::connect(socket)
                    .map_err(|e| Error::Launch(format!("cannot reach the launcher's socket: {e}")))
            };
            let stream = connect()?;
            let comm = MpiCommunicator::new(
                collectives
                    .take()
                    .ok_or_else(|| Error::Launch("the group was started twice".into()))?,
            );
            let secret = secret.to_string();
            let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(size);
            threads.push(std::thread::spawn(move || {
                let given = CommSource::Given(Box::new(comm));
                if let Err(e) = serve(stream, 0, size, &secret, given) {
                    eprintln!("parallelformers rank 0: {e}");
                }
            }));
            for peer in 1..size {
                let stream = connect()?;
                let control = control.clone();
                threads.push(std::thread::spawn(move || tunnel(stream, &control, peer)));
            }
            Ok(threads)
        })?;
        Ok((
            group,
            MpiFinalizer {
                _universe: universe,
            },
        ))
    }

    /// A rank other than 0: serves the launcher on rank 0 until it shuts the group down.
    pub fn serve(self) -> Result<()> {
        let MpiJob {
            universe,
            control,
            collectives,
            rank,
            size,
        } = self;
        let secret = share_secret(&control, "");
        let (ours, theirs) = UnixStream::pair()
            .map_err(|e| Error::Launch(format!("cannot make a socket pair: {e}")))?;
        let link = {
            let control = control.clone();
            std::thread::spawn(move || tunnel(theirs, &control, 0))
        };
        let comm = CommSource::Given(Box::new(MpiCommunicator::new(collectives)));
        let served = serve(ours, rank, size, &secret, comm);
        let _ = link.join();
        // Every communicator is freed before MPI is finalised.
        drop(control);
        drop(universe);
        served
    }
}

impl MpiJob {
    /// Runs `f` with this rank's collectives over MPI (no launcher: every rank runs `f`), then
    /// finalises MPI.
    pub fn with_collectives<R>(self, f: impl FnOnce(&MpiCommunicator) -> R) -> R {
        let comm = MpiCommunicator::new(self.collectives);
        let result = f(&comm);
        // Every communicator is freed before MPI is finalised.
        drop(comm);
        drop(self.control);
        drop(self.universe);
        result
    }
}

/// The launcher's `secret` (rank 0's) on every rank: a collective of all ranks.
fn share_secret(control: &SharedComm, secret: &str) -> String {
    let mut bytes = [0u8; SECRET_LEN];
    let len = secret.len().min(SECRET_LEN);
    bytes[..len].copy_from_slice(&secret.as_bytes()[..len]);
    control.0.process_at_rank(0).broadcast_into(&mut bytes[..]);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Finalises MPI when dropped, after the group it outlives.
pub struct MpiFinalizer {
    _universe: Universe,
}

/// Carries bytes both ways between `stream` and MPI rank `peer` until either side closes.
fn tunnel(mut stream: UnixStream, control: &SharedComm, peer: usize) {
    let peer_process = control.0.process_at_rank(peer as i32);
    if stream.set_nonblocking(true).is_err() {
        peer_process.send_with_tag(&[0u8; 0][..], TUNNEL);
        return;
    }
    let mut buffer = vec![0u8; PIECE_BYTES];
    let mut idle = TUNNEL_IDLE;
    loop {
        let mut busy = false;
        match stream.read(&mut buffer) {
            Ok(0) => {
                peer_process.send_with_tag(&[0u8; 0][..], TUNNEL);
                return;
            }
            Ok(n) => {
                peer_process.send_with_tag(&buffer[..n], TUNNEL);
                busy = true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => {
                peer_process.send_with_tag(&[0u8; 0][..], TUNNEL);
                return;
            }
        }
        while let Some(probed) = peer_process.immediate_matched_probe_with_tag(TUNNEL) {
            let (bytes, _) = probed.matched_receive_vec::<u8>();
            if bytes.is_empty() || write_all(&mut stream, &bytes).is_err() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            busy = true;
        }
        if busy {
            idle = TUNNEL_IDLE;
        } else {
            std::thread::sleep(idle);
            idle = (idle * 2).min(TUNNEL_IDLE_MAX);
        }
    }
}

/// Writes all of `bytes` to a non-blocking stream, waiting while it is full.
fn write_all(stream: &mut UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                std::thread::sleep(TUNNEL_IDLE)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
