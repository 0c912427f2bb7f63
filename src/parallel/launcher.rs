//! Starting, supervising and stopping the worker processes, in one place.
//!
//! The launcher creates a private directory (mode 0700) holding the rendezvous socket and the
//! shared-memory region for the communicator, starts one process per rank, and accepts only
//! connections that present the run's secret. Every wait has a deadline and watches the
//! children: if any rank exits, fails or stops answering, the communicator is aborted, every rank
//! is killed and reaped, and the caller gets an error naming the rank with its last words.
//! Children die with the launcher too (`PR_SET_PDEATHSIG`). The region is an anonymous memfd, so
//! nothing can be left behind in `/dev/shm`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::comm::{ShmRegion, DEFAULT_SLOT_BYTES};

/// The smallest slot a region allows (one cache line): enough for a group that only beats.
const LINE_BYTES: usize = 128;
use crate::error::{Error, Result};
use crate::parallel::ipc::{decode, encode_frame, read_frame, FrameReader, Reply, Request};
use crate::parallel::outbox::Outbox;
use crate::parallel::process::env;

/// How often waits wake up to check on the children.
const POLL: Duration = Duration::from_millis(20);

/// The longest the launcher reads streamed replies before it asks its listener for control
/// messages again.
const DRAIN: Duration = Duration::from_millis(2);
/// Lines of each rank's standard error kept for error messages.
const TAIL_LINES: usize = 20;
/// How long the other ranks may take to answer once one rank has reported an error.
const ERROR_GRACE: Duration = Duration::from_secs(2);
/// How long ranks get to exit after a shutdown request before they are killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long a rank's heartbeat may stand still before the rank counts as stopped (it beats every
/// [`HEARTBEAT_INTERVAL`]).
const HEARTBEAT_STALL: Duration = Duration::from_millis(1500);
/// How often a rank's heartbeat thread beats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Number of ranks.
    pub ranks: usize,
    /// Compute threads per rank.
    pub threads_per_rank: usize,
    /// The executable to run for each rank.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Echo the ranks' standard error, prefixed with the rank.
    pub echo_stderr: bool,
    /// Deadline for every rank to connect.
    pub startup_timeout: Duration,
    /// Where to back the shared memory with a file (`None`: anonymous memory).
    pub comm_dir: Option<PathBuf>,
}

/// How a rank runs.
enum Runner {
    /// A child process this launcher started.
    Child(Child),
    /// A rank started by someone else (an MPI rank, reached through a tunnel, or a worker
    /// thread of this process): the thread of this process that serves it.
    Thread(JoinHandle<()>),
}

impl Runner {
    /// How the rank ended, once it has.
    fn ended(&mut self) -> Option<String> {
        match self {
            Runner::Child(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot be waited for: {e}")),
            },
            Runner::Thread(handle) => handle.is_finished().then(|| "its link closed".to_string()),
        }
    }

    /// Ends a rank that did not exit in time: kills a child; a thread is left to end with
    /// its link.
    fn kill(&mut self) {
        if let Runner::Child(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct RankProcess {
    rank: usize,
    runner: Runner,
    stream: Option<UnixStream>,
    reader: FrameReader,
    /// Frames on their way to the rank (the launcher never blocks on a write).
    outbox: Outbox,
    tail: Arc<Mutex<VecDeque<String>>>,
    tail_thread: Option<JoinHandle<()>>,
    /// The heartbeat count last seen, and when it last changed.
    heartbeat: (u64, Instant),
}

impl RankProcess {
    fn last_words(&self) -> String {
        let tail = self
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        if tail.is_empty() {
            "(no output)".into()
        } else {
            tail
        }
    }
}

/// The running ranks of one model.
pub struct WorkerGroup {
    ranks: Vec<RankProcess>,
    /// What must outlive the ranks and be dropped after them (MPI's finalisation).
    keep: Option<Box<dyn std::any::Any + Send>>,
    /// The communicator's region (also where every rank's heartbeat is read).
    region: Option<ShmRegion>,
    dir: Option<tempfile::TempDir>,
    failure: Option<String>,
    /// What another thread needs to end the ranks if this group's thread is stuck, and the
    /// group's id in [`LIVE_GROUPS`].
    killer: (u64, Killer),
}

/// Every group of this process that has not stopped, by id, for [`end_every_group`].
static LIVE_GROUPS: Mutex<Vec<(u64, Killer)>> = Mutex::new(Vec::new());
/// The id of the next group.
static NEXT_GROUP: AtomicU64 = AtomicU64::new(0);

/// Ends every worker group of this process from any thread: kills each rank process and
/// removes each group's private directory. The last resort of a process that must stop while
/// the thread that owns a group waits on a rank that will never answer; that thread then sees
/// its ranks exit.
pub fn end_every_group() {
    let Ok(groups) = LIVE_GROUPS.lock() else {
        return;
    };
    for (_, killer) in groups.iter() {
        killer.kill();
        killer.remove_files();
    }
}

/// Ends a group's ranks from another thread. Process ids are held as pidfds, so a rank already
/// reaped is never mistaken for another process that got its id.
#[derive(Debug, Clone)]
struct Killer {
    pidfds: Arc<Mutex<Vec<OwnedFd>>>,
    dir: PathBuf,
}

impl Killer {
    /// A killer for the group with private directory `dir`, listed in [`LIVE_GROUPS`] under a
    /// new id (returned) until [`Killer::forget`].
    fn register(dir: &std::path::Path) -> (u64, Self) {
        let killer = Killer {
            pidfds: Arc::default(),
            dir: dir.to_path_buf(),
        };
        let id = NEXT_GROUP.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut groups) = LIVE_GROUPS.lock() {
            groups.push((id, killer.clone()));
        }
        (id, killer)
    }

    /// Takes group `id` off [`LIVE_GROUPS`] (it has stopped).
    fn forget(id: u64) {
        if let Ok(mut groups) = LIVE_GROUPS.lock() {
            groups.retain(|(group, _)| *group != id);
        }
    }

    /// Remembers rank process `pid` (best effort: without pidfds, it cannot be killed here).
    fn watch(&self, pid: u32) {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return;
        }
        // SAFETY: `fd` is a descriptor the kernel just gave this process; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if let Ok(mut pidfds) = self.pidfds.lock() {
            pidfds.push(fd);
        }
    }

    /// Sends SIGKILL to every rank process (those already gone are unaffected).
    fn kill(&self) {
        let Ok(pidfds) = self.pidfds.lock() else {
            return;
        };
        for fd in pidfds.iter() {
            // SAFETY: pidfd_send_signal with a pidfd this process owns, no siginfo, no flags.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }

    /// Removes the group's private directory (the rendezvous socket) if it is still there.
    fn remove_files(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data filled in by sched_getaffinity; CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Default threads per rank: available cores ÷ ranks, at least one.
pub fn default_threads(ranks: usize) -> usize {
    (allowed_cpus().len().max(1) / ranks.max(1)).max(1)
}

/// A private directory with the Unix socket ranks connect to.
fn rendezvous() -> Result<(tempfile::TempDir, PathBuf, UnixListener)> {
    let dir = tempfile::Builder::new()
        .prefix("parallelformers-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(|e| Error::Launch(format!("cannot create a private directory: {e}")))?;
    let socket = dir.path().join("rendezvous.sock");
    let listener = UnixListener::bind(&socket)
        .map_err(|e| Error::Launch(format!("cannot listen on {}: {e}", socket.display())))?;
    Ok((dir, socket, listener))
}

fn random_secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl WorkerGroup {
    /// Starts the ranks and waits until each has connected and proved it is ours.
    pub fn spawn(spec: &LaunchSpec) -> Result<Self> {
        let (dir, socket, listener) = rendezvous()?;
        // A single rank needs no communicator, but its region carries the heartbeat.
        let slot_bytes = if spec.ranks > 1 {
            DEFAULT_SLOT_BYTES
        } else {
            LINE_BYTES
        };
        let region = match &spec.comm_dir {
            Some(dir) => ShmRegion::create_in(dir, spec.ranks, slot_bytes),
            None => ShmRegion::create(spec.ranks, slot_bytes),
        }
        .map_err(|e| {
            let hint = match spec.comm_dir {
                Some(_) => "",
                None => {
                    " (--comm-dir DIR, or Options::comm_dir, backs it with a file in DIR instead)"
                }
            };
            Error::Launch(format!("{e}{hint}"))
        })?;
        set_cloexec(region.fd());
        let region = Some(region);
        let secret = random_secret();
        let cpus = allowed_cpus();
        let mut group = WorkerGroup {
            ranks: Vec::with_capacity(spec.ranks),
            region,
            killer: Killer::register(dir.path()),
            dir: Some(dir),
            failure: None,
            keep: None,
        };
        for rank in 0..spec.ranks {
            let pinned: Vec<String> = if cpus.len() >= spec.ranks * spec.threads_per_rank {
                cpus[rank * spec.threads_per_rank..(rank + 1) * spec.threads_per_rank]
                    .iter()
                    .map(|c| c.to_string())
                    .collect()
            } else {
                Vec::new()
            };
            let process = group.start_rank(spec, rank, &socket, &secret, &pinned.join(","))?;
            if let Runner::Child(child) = &process.runner {
                group.killer.1.watch(child.id());
            }
            group.ranks.push(process);
        }
        group.accept_all(&listener, &secret, spec.startup_timeout)?;
        Ok(group)
    }

    /// Keeps `value` until the ranks have stopped, then drops it.
    pub fn keep_until_stopped(&mut self, value: Box<dyn std::any::Any + Send>) {
        self.keep = Some(value);
    }

    /// Waits for `ranks` ranks that `start` sets going instead of processes of this launcher:
    /// given the rendezvous socket and the secret, it returns, in rank order, the thread of this
    /// process that serves each (a worker thread, or a tunnel to an MPI rank). There is no
    /// shared-memory region, so no heartbeat: a rank that dies ends its link.
    pub fn adopt(
        ranks: usize,
        startup_timeout: Duration,
        start: impl FnOnce(&std::path::Path, &str) -> Result<Vec<JoinHandle<()>>>,
    ) -> Result<Self> {
        let (dir, socket, listener) = rendezvous()?;
        let secret = random_secret();
        let threads = start(&socket, &secret)?;
        let mut group = WorkerGroup {
            ranks: threads
                .into_iter()
                .enumerate()
                .map(|(rank, thread)| RankProcess {
                    rank,
                    runner: Runner::Thread(thread),
                    stream: None,
                    reader: FrameReader::default(),
                    outbox: Outbox::default(),
                    tail: Arc::new(Mutex::new(VecDeque::new())),
                    tail_thread: None,
                    heartbeat: (0, Instant::now()),
                })
                .collect(),
            region: None,
            killer: Killer::register(dir.path()),
            dir: Some(dir),
            failure: None,
            keep: None,
        };
        if group.ranks.len() != ranks {
            return Err(Error::Launch(format!(
                "{} ranks were started, {ranks} expected",
                group.ranks.len()
            )));
        }
        group.accept_all(&listener, &secret, startup_timeout)?;
        Ok(group)
    }

    fn start_rank(
        &mut self,
        spec: &LaunchSpec,
        rank: usize,
        socket: &std::path::Path,
        secret: &str,
        cpus: &str,
    ) -> Result<RankProcess> {
        let threads = spec.threads_per_rank.to_string();
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env(env::RANK, rank.to_string())
            .env(env::LOCAL_RANK, rank.to_string())
            .env(env::WORLD_SIZE, spec.ranks.to_string())
            .env(env::RENDEZVOUS, socket)
            .env(env::SECRET, secret)
            .env(env::THREADS, &threads)
            .env(env::CPUS, cpus)
            .env("RAYON_NUM_THREADS", &threads)
            .env("CANDLE_NUM_THREADS", &threads)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let comm_fd = self.region.as_ref().map(|r| r.fd());
        if let Some(fd) = comm_fd {
            command.env(env::COMM_FD, fd.to_string());
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid, fcntl, _exit), touching no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                if let Some(fd) = comm_fd {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            Error::Launch(format!(
                "cannot start rank {rank} ({}): {e}",
                spec.program.display()
            ))
        })?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail_thread = child.stderr.take().map(|stderr| {
            let tail = Arc::clone(&tail);
            let echo = spec.echo_stderr;
            std::thread::spawn(move || keep_tail(rank, stderr, &tail, echo))
        });
        Ok(RankProcess {
            rank,
            runner: Runner::Child(child),
            stream: None,
            reader: FrameReader::default(),
            outbox: Outbox::default(),
            tail,
            tail_thread,
            heartbeat: (0, Instant::now()),
        })
    }

    fn accept_all(
        &mut self,
        listener: &UnixListener,
        secret: &str,
        timeout: Duration,
    ) -> Result<()> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Launch(format!("rendezvous socket: {e}")))?;
        let deadline = Instant::now() + timeout;
        while self.ranks.iter().any(|r| r.stream.is_none()) {
            match listener.accept() {
                Ok((stream, _)) => self.admit(stream, secret),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.check_alive()?;
                    if Instant::now() > deadline {
                        let missing: Vec<usize> = self
                            .ranks
                            .iter()
                            .filter(|r| r.stream.is_none())
                            .map(|r| r.rank)
                            .collect();
                        return Err(self.fail(
                            missing[0],
                            format!(
                                "did not connect within {timeout:?} (ranks {missing:?} missing)"
                            ),
                        ));
                    }
                    std::thread::sleep(POLL);
                }
                Err(e) => return Err(Error::Launch(format!("rendezvous socket: {e}"))),
            }
        }
        // Every rank is connected: the socket has done its job. Removing its directory now
        // leaves nothing behind even if this process is killed without a chance to clean up.
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
        Ok(())
    }

    /// Reads the handshake of a new connection; a peer without the secret is dropped and logged.
    fn admit(&mut self, mut stream: UnixStream, secret: &str) {
        let handshake = stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(Duration::from_secs(5))))
            .and_then(|_| read_frame::<Reply>(&mut stream));
        match handshake {
            Ok(Reply::Hello {
                rank,
                secret: theirs,
            }) if theirs == secret
                && rank < self.ranks.len()
                && self.ranks[rank].stream.is_none() =>
            {
                if stream.set_read_timeout(Some(POLL)).is_ok() {
                    self.ranks[rank].stream = Some(stream);
                }
            }
            _ => tracing::warn!(
                "dropped a connection to the rendezvous socket that failed the handshake"
            ),
        }
    }

    /// Why the group is unusable, if it is.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Sends `request` to every rank and collects one reply from each, in rank order.
    /// An error on any rank is returned with its rank; a rank that dies stops the group.
    pub fn request(&mut self, request: &Request, timeout: Option<Duration>) -> Result<Vec<Reply>> {
        self.request_streaming(request, timeout, &mut |_: &Reply| None)
    }

    /// Like [`WorkerGroup::request`], passing the partial replies ([`Reply::is_partial`]) that
    /// arrive before the final ones to `listener`; the control messages it returns are sent to
    /// rank 0 at once, without an answer.
    pub fn request_streaming(
        &mut self,
        request: &Request,
        timeout: Option<Duration>,
        listener: &mut dyn Listener,
    ) -> Result<Vec<Reply>> {
        if let Some(failure) = &self.failure {
            return Err(Error::Launch(format!(
                "the worker group is stopped: {failure}"
            )));
        }
        let frame = encode_frame(request)
            .map_err(|e| Error::Launch(format!("cannot encode a request: {e}")))?;
        for i in 0..self.ranks.len() {
            self.send(i, &frame, "a request")?;
        }
        self.collect(timeout, listener)
    }

    fn collect(
        &mut self,
        timeout: Option<Duration>,
        listener: &mut dyn Listener,
    ) -> Result<Vec<Reply>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut replies: Vec<Option<Reply>> = vec![None; self.ranks.len()];
        let mut first_error: Option<(usize, String, Instant)> = None;
        while replies.iter().any(Option::is_none) {
            let waiting: Vec<usize> = (0..self.ranks.len())
                .filter(|&i| replies[i].is_none())
                .collect();
            self.wait(&waiting);
            self.flush_all()?;
            let drain_until = Instant::now() + DRAIN;
            let mut controls = Vec::new();
            for &i in &waiting {
                // Drain what the rank has sent: a batch streams several tokens per step, and
                // a backlog would fill the socket and stall the rank. But not for longer than
                // DRAIN: a rank that streams as fast as it is read would keep the listener
                // from ever being asked for control messages (sequences to join).
                while let Some(reply) = self.poll_rank(i)? {
                    if reply.is_partial() {
                        controls.extend(listener.partial(&reply));
                        if Instant::now() > drain_until {
                            break;
                        }
                        continue;
                    }
                    if let (Reply::Error(message), None) = (&reply, &first_error) {
                        first_error = Some((i, message.clone(), Instant::now()));
                    }
                    replies[i] = Some(reply);
                    break;
                }
            }
            if replies[0].is_none() {
                controls.extend(listener.tick());
            }
            self.send_controls(controls)?;
            self.check_alive()?;
            let now = Instant::now();
            if let Some((rank, message, at)) = &first_error {
                if now > *at + ERROR_GRACE && replies.iter().any(Option::is_none) {
                    return Err(self.fail(*rank, message.clone()));
                }
            }
            if deadline.is_some_and(|d| now > d) {
                let silent = replies.iter().position(Option::is_none).unwrap_or(0);
                return Err(self.fail(
                    silent,
                    format!("did not answer within {:?}", timeout.unwrap_or_default()),
                ));
            }
        }
        if let Some((rank, message, _)) = first_error {
            return Err(Error::Rank { rank, message });
        }
        Ok(replies.into_iter().flatten().collect())
    }

    /// Sleeps until one of the `ranks` has something to read, a rank with frames waiting in its
    /// outbox can take more, or [`POLL`] has passed.
    fn wait(&self, ranks: &[usize]) {
        let mut fds: Vec<libc::pollfd> = self
            .ranks
            .iter()
            .enumerate()
            .filter_map(|(i, rank)| {
                let reading = ranks.contains(&i);
                let writing = !rank.outbox.is_empty();
                let events = match (reading, writing) {
                    (true, true) => libc::POLLIN | libc::POLLOUT,
                    (true, false) => libc::POLLIN,
                    (false, true) => libc::POLLOUT,
                    (false, false) => return None,
                };
                rank.stream.as_ref().map(|stream| libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events,
                    revents: 0,
                })
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds for sockets this process owns. An error
        // (an interrupting signal) only ends the wait early.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                POLL.as_millis() as i32,
            );
        }
    }

    /// Reads rank `i`'s reply if one has arrived, without waiting for one that has not; a
    /// broken connection fails the group.
    fn poll_rank(&mut self, i: usize) -> Result<Option<Reply>> {
        let rank = &mut self.ranks[i];
        let polled = match rank.stream.as_mut() {
            Some(stream) if !readable(stream) => Ok(None),
            Some(stream) => rank.reader.poll(stream),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        };
        match polled.and_then(|payload| payload.map(|p| decode::<Reply>(&p)).transpose()) {
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.connection_lost(i, format!("connection lost: {e}"))),
        }
    }

    /// Fails the group for rank `i`, whose socket failed with `what`. A rank that closed its
    /// end is usually dying: it is given a moment to finish, so that the error gives its exit
    /// status; either way the error carries its last words.
    fn connection_lost(&mut self, i: usize, what: String) -> Error {
        let deadline = Instant::now() + ERROR_GRACE / 4;
        while Instant::now() < deadline {
            if let Err(exited) = self.check_exited() {
                return exited;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let words = self.ranks[i].last_words();
        self.fail(i, format!("{what}; last words:\n{words}"))
    }

    /// Checks, without a request, that every rank still runs (a dead one fails the group).
    pub fn check_health(&mut self) -> Result<()> {
        if let Some(failure) = &self.failure {
            return Err(Error::Launch(format!(
                "the worker group is stopped: {failure}"
            )));
        }
        self.check_alive()
    }

    /// Fails the group if any rank has exited, or has stopped beating ([`HEARTBEAT_STALL`]
    /// after its first beat: a stopped or frozen process).
    fn check_alive(&mut self) -> Result<()> {
        self.check_exited()?;
        let now = Instant::now();
        for i in 0..self.ranks.len() {
            let count = self.region.as_ref().map_or(0, |r| r.heartbeat(i));
            let (seen, since) = &mut self.ranks[i].heartbeat;
            if count != *seen {
                (*seen, *since) = (count, now);
            } else if count > 0 && now - *since > HEARTBEAT_STALL {
                let silent = now - *since;
                let words = self.ranks[i].last_words();
                return Err(self.fail(
                    i,
                    format!(
                        "stopped answering: no sign of life for {:.1} s; last words:\n{words}",
                        silent.as_secs_f64()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Fails the group if any rank has exited.
    fn check_exited(&mut self) -> Result<()> {
        for i in 0..self.ranks.len() {
            if let Some(status) = self.ranks[i].runner.ended() {
                // Let the stderr reader catch the last lines.
                if let Some(handle) = self.ranks[i].tail_thread.take() {
                    let _ = handle.join();
                }
                let words = self.ranks[i].last_words();
                return Err(self.fail(
                    i,
                    format!("exited unexpectedly ({status}); last words:\n{words}"),
                ));
            }
        }
        Ok(())
    }

    /// Queues `frame` for rank `i` and writes what its socket takes now (never blocking);
    /// `what` names the frame in an error.
    fn send(&mut self, i: usize, frame: &[u8], what: &str) -> Result<()> {
        self.ranks[i].outbox.push(frame);
        self.flush(i, what)
    }

    /// Writes what rank `i`'s socket takes now of its outbox; a broken socket fails the group,
    /// naming `what` was being sent.
    fn flush(&mut self, i: usize, what: &str) -> Result<()> {
        let rank = &mut self.ranks[i];
        let flushed = match rank.stream.as_ref() {
            Some(stream) => rank.outbox.flush(stream),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        };
        flushed.map_err(|e| self.connection_lost(i, format!("cannot send {what}: {e}")))
    }

    /// Writes what each rank's socket takes now of its outbox.
    fn flush_all(&mut self) -> Result<()> {
        for i in 0..self.ranks.len() {
            if !self.ranks[i].outbox.is_empty() {
                self.flush(i, "a request")?;
            }
        }
        Ok(())
    }

    /// Sends control messages to rank 0 in the middle of a request, the cancellations merged
    /// into one message after the others (a sequence may be cancelled as it joins).
    fn send_controls(&mut self, controls: Vec<Request>) -> Result<()> {
        let mut finished = Vec::new();
        for control in controls {
            match control {
                Request::Finish(ids) => finished.extend(ids),
                other => self.send_control(&other)?,
            }
        }
        match finished.is_empty() {
            true => Ok(()),
            false => self.send_control(&Request::Finish(finished)),
        }
    }

    fn send_control(&mut self, control: &Request) -> Result<()> {
        let frame = encode_frame(control)
            .map_err(|e| Error::Launch(format!("cannot encode a control message: {e}")))?;
        self.send(0, &frame, "a control message")
    }

    /// Marks the group failed because of `rank`, stops every rank, and builds the error.
    fn fail(&mut self, rank: usize, message: String) -> Error {
        self.failure = Some(format!("rank {rank} failed: {message}"));
        self.stop(Duration::ZERO);
        Error::Rank { rank, message }
    }

    /// Aborts collectives, asks each rank to exit, waits up to `grace`, kills the rest, and
    /// reaps every child.
    fn stop(&mut self, grace: Duration) {
        if let Some(region) = &self.region {
            region.abort();
        }
        // Best effort and never blocking: a rank that cannot take the request is killed
        // once the grace has passed.
        let shutdown = encode_frame(&Request::Shutdown).unwrap_or_default();
        for rank in &mut self.ranks {
            if let Some(stream) = rank.stream.as_ref() {
                rank.outbox.push(&shutdown);
                let _ = rank.outbox.flush(stream);
            }
        }
        let deadline = Instant::now() + grace;
        for rank in &mut self.ranks {
            while rank.runner.ended().is_none() {
                if Instant::now() >= deadline {
                    rank.runner.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            rank.stream = None;
            if let Some(handle) = rank.tail_thread.take() {
                let _ = handle.join();
            }
        }
        self.region = None;
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
        Killer::forget(self.killer.0);
    }

    /// Stops every rank cleanly (killing those that do not exit in time).
    pub fn shutdown(&mut self) {
        if self.failure.is_none() {
            self.failure = Some("the model was deparallelized".into());
        }
        self.stop(EXIT_GRACE);
    }

    /// Process ids of the ranks this launcher started (for tests and diagnostics).
    pub fn pids(&self) -> Vec<u32> {
        self.ranks
            .iter()
            .filter_map(|r| match &r.runner {
                Runner::Child(child) => Some(child.id()),
                Runner::Thread(_) => None,
            })
            .collect()
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether `stream` has data (or an end of stream) to read now.
fn readable(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket this process owns, and a zero timeout.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 && fd.revents != 0 }
}

/// The caller's side of a streaming request: it hears the partial replies and may answer with
/// control messages for rank 0.
pub trait Listener {
    /// A partial reply (a streamed token, an ended sequence, an idle session); returns the
    /// control messages to send to rank 0.
    fn partial(&mut self, reply: &Reply) -> Vec<Request>;
    /// Called whenever the launcher wakes while rank 0 works (at least every 20 ms); returns
    /// the control messages to send to rank 0.
    fn tick(&mut self) -> Vec<Request> {
        Vec::new()
    }
}

/// A closure listener answers each partial reply with at most one control message.
impl<F: FnMut(&Reply) -> Option<Request>> Listener for F {
    fn partial(&mut self, reply: &Reply) -> Vec<Request> {
        self(reply).into_iter().collect()
    }
}

/// Marks `fd` close-on-exec, so that only our ranks (which clear the flag between fork and
/// exec) inherit it, not other programs this process starts.
fn set_cloexec(fd: i32) {
    // SAFETY: F_SETFD on a descriptor we own only changes its close-on-exec flag.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

/// Keeps the last lines a rank wrote to standard error, echoing them when asked.
fn keep_tail(rank: usize, stderr: impl std::io::Read, tail: &Mutex<VecDeque<String>>, echo: bool) {
    for line in BufReader::new(stderr)
        .lines()
        .map_while(std::result::Result::ok)
    {
        if echo {
            eprintln!("[rank {rank}] {line}");
        }
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_rendezvous_directory_is_private() {
        let (dir, socket, _listener) = rendezvous().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        assert!(socket.starts_with(dir.path()));
    }
}
