//! Shared-memory backend: ranks on one host exchange data through one anonymous memory region.
//!
//! # Region
//!
//! [`ShmRegion::create`] makes an anonymous file with `memfd_create(2)` and maps it. The file has
//! no name in any file system (nothing appears in `/dev/shm`), so no segment can leak: the kernel
//! frees the memory once the last descriptor and the last mapping are gone, however the
//! processes end. The descriptor is created **without** `FD_CLOEXEC`, so children started with
//! [`std::process::Command`] inherit it under the same number; the launcher passes that number
//! (for instance in an environment variable) and each rank calls [`ShmCommunicator::attach`].
//! The file is sealed against shrinking and growing, so no process can truncate it under the
//! others' mappings.
//!
//! Layout (every block starts on a 128-byte boundary, so two ranks never write to the same
//! cache line or to an adjacent-line prefetch pair):
//!
//! ```text
//! [header: magic, version, world size, slot size, total size]      128 B
//! [abort flag]                                                      128 B
//! [rank line r: epoch counter, attach claim]                        128 B x N
//! [slot (set s, rank r): op, length, aux | data (slot_bytes)]       (128 B + data) x 2N
//! [result area (slot_bytes)]
//! ```
//!
//! # Synchronisation
//!
//! The only synchronisation primitive is a barrier built from per-rank epoch counters: to pass
//! barrier number `e`, rank `r` stores `e` into its own counter (`Release`) and waits until every
//! other counter is at least `e` (`Acquire`). No location is written by more than one rank, so
//! there is no read-modify-write hot spot. Ranks never drift more than one barrier apart, and the
//! release/acquire pair makes everything a rank wrote before arriving visible to everyone who
//! passed the barrier.
//!
//! Waiting spins briefly (`spin_loop`: 50 µs when every rank can have a CPU of its own, 5 µs when
//! ranks outnumber CPUs), then sleeps with doubling intervals capped at [`MAX_SLEEP`]: with more
//! ranks than cores, spinning ranks would steal the CPU from the rank everybody waits for, and a
//! slow rank then costs the others at most one sleep interval of extra latency. (Why there is no
//! `yield_now` phase: see `Backoff`.) Every wait also watches the abort flag, so
//! [`ShmRegion::abort`] (called by the launcher when a rank dies) turns every blocked or future
//! collective into [`CommError::Aborted`] within a sleep interval.
//!
//! # Rounds and double buffering
//!
//! Each collective runs in one or more *rounds*; a round moves at most one slot of data per rank,
//! so any length works, however much larger than a slot. Rounds alternate between two slot sets
//! (by a per-rank round counter that all ranks advance in step). A slot read during round `k` is
//! rewritten by its owner only in round `k + 2`, after the first barrier of round `k + 1`, which
//! no rank reaches before it has finished reading round `k`. That makes one barrier per round
//! enough for gathers and broadcasts:
//!
//! * **all_gather** — rank `r` writes the next piece of its part into its slot (round 0 also
//!   publishes its part length); barrier; everyone copies every rank's piece. All ranks derive
//!   the same number of rounds, `ceil(max part length / slot capacity)`, from the published
//!   lengths.
//! * **broadcast** — the root writes a piece into its slot; barrier; the others copy it.
//! * **all_reduce_sum** — rank `r` writes a piece of its buffer into its slot; barrier; then
//!   - small pieces (`piece length x N <= 16 Ki` elements, e.g. one hidden state during decoding):
//!     every rank sums the whole piece over the slots in rank order `0, 1, .., N-1` into its own
//!     buffer — one barrier per round, and at this size latency is all that matters;
//!   - larger pieces: rank `r` sums only its own `1/N` share (whole cache lines) in the same rank
//!     order into the result area (a reduce-scatter); barrier; everyone copies the whole result.
//!     The result area is written again only after the first barrier of a later round, which
//!     every rank reaches only after copying it out.
//!
//!   Either way every element is computed as `((x0 + x1) + x2) + ...`, so every rank receives
//!   bit-identical sums, whatever order the ranks arrived in.
//! * **barrier** — one round without data.
//!
//! In round 0 every rank also writes the operation, its length and its root into its slot
//! header. After the first barrier every rank checks all headers and reaches the same verdict, so
//! mismatched calls (different collectives, lengths or roots) fail with the same error on every
//! rank, after the same number of barriers, and the group remains usable.

use std::cell::Cell;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::mem::{size_of, size_of_val, MaybeUninit};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::slice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use super::{CommError, Communicator};

/// Default data capacity of one rank's slot: 4 MiB, i.e. 1 Mi `f32` per round.
pub const DEFAULT_SLOT_BYTES: usize = 4 << 20;

/// Name given to the anonymous file (visible only in `/proc/<pid>/fd`).
const REGION_NAME: &CStr = c"parallelformers-comm";
/// Identifies a communicator region ("PFCOMM" plus two format bytes).
const MAGIC: u64 = u64::from_le_bytes(*b"PFCOMM\x00\x01");
/// Layout version; bump on any incompatible change.
const VERSION: u64 = 1;
/// Alignment and padding unit of every block (two cache lines).
const LINE: usize = 128;
/// Number of `f32` summed per block of the reduction (keeps the partial sums in L1).
const REDUCE_BLOCK: usize = 2048;
/// Largest `piece length x world size` that every rank sums on its own; above it the ranks
/// split the summation (reduce-scatter), which costs a second barrier but reads less memory.
const DIRECT_REDUCE_ELEMENTS: usize = 16 * 1024;
/// Granularity of the ranks' shares of a reduction (one padding unit of `f32`).
const SHARE_UNIT: usize = LINE / size_of::<f32>();

/// How long a waiting rank spins before it starts sleeping, when every rank can have a CPU.
const SPIN_WINDOW: Duration = Duration::from_micros(50);
/// How long a waiting rank spins when there are more ranks than CPUs (spinning would only delay
/// the ranks it waits for).
const SHORT_SPIN_WINDOW: Duration = Duration::from_micros(5);
/// First sleep interval of a waiting rank.
const FIRST_SLEEP: Duration = Duration::from_micros(10);
/// Longest sleep interval of a waiting rank; bounds the extra latency after a slow rank arrives.
pub const MAX_SLEEP: Duration = Duration::from_micros(250);

/// Operation tags written into slot headers.
const OP_BARRIER: u64 = 1;
const OP_ALL_REDUCE: u64 = 2;
const OP_ALL_GATHER: u64 = 3;
const OP_BROADCAST: u64 = 4;

/// Human-readable name of an operation tag, for [`CommError::CollectiveMismatch`].
fn op_name(op: u64) -> &'static str {
    match op {
        OP_BARRIER => "barrier",
        OP_ALL_REDUCE => "all_reduce_sum",
        OP_ALL_GATHER => "all_gather",
        OP_BROADCAST => "broadcast",
        _ => "an unknown operation",
    }
}

/// Region header, at offset 0. Written once by the creator before any descriptor is handed out.
#[repr(C)]
struct RegionHeader {
    magic: AtomicU64,
    version: AtomicU64,
    world_size: AtomicU64,
    slot_bytes: AtomicU64,
    total_bytes: AtomicU64,
}

/// Per-rank control line; only its rank writes `epoch`.
#[repr(C)]
struct RankLine {
    /// Number of barriers this rank has arrived at.
    epoch: AtomicU64,
    /// Set to 1 by the communicator that attached as this rank.
    claimed: AtomicU64,
    /// Raised by the rank's [`Heartbeat`] while the process runs (its supervisor reads it).
    heartbeat: AtomicU64,
}

/// Header of one slot: what its rank called in round 0 of the current collective.
#[repr(C)]
struct SlotHeader {
    op: AtomicU64,
    len: AtomicU64,
    aux: AtomicU64,
}

// Every control structure must fit in its padded line.
const _: () = assert!(size_of::<RegionHeader>() <= LINE);
const _: () = assert!(size_of::<RankLine>() <= LINE);
const _: () = assert!(size_of::<SlotHeader>() <= LINE);

/// Byte offsets of every block of a region with a given world size and slot size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    world_size: usize,
    slot_bytes: usize,
    slot_stride: usize,
    slots_offset: usize,
    result_offset: usize,
    total: usize,
}

impl Layout {
    /// Computes the layout, rejecting sizes that are zero, misaligned or overflow.
    fn new(world_size: usize, slot_bytes: usize) -> Result<Self, CommError> {
        if world_size == 0 {
            return Err(CommError::InvalidWorldSize { world_size });
        }
        let bad_slot = CommError::InvalidSlotSize { slot_bytes };
        if slot_bytes == 0 || !slot_bytes.is_multiple_of(size_of::<f32>()) {
            return Err(bad_slot);
        }
        let data = slot_bytes.checked_next_multiple_of(LINE).ok_or(bad_slot)?;
        let bad_world = || CommError::InvalidWorldSize { world_size };
        let slot_stride = data.checked_add(LINE).ok_or_else(bad_world)?;
        let slots_offset = world_size
            .checked_add(2)
            .and_then(|lines| lines.checked_mul(LINE))
            .ok_or_else(bad_world)?;
        let result_offset = world_size
            .checked_mul(2)
            .and_then(|slots| slots.checked_mul(slot_stride))
            .and_then(|bytes| bytes.checked_add(slots_offset))
            .ok_or_else(bad_world)?;
        let total = result_offset.checked_add(data).ok_or_else(bad_world)?;
        if libc::off_t::try_from(total).is_err() {
            return Err(bad_world());
        }
        Ok(Self {
            world_size,
            slot_bytes,
            slot_stride,
            slots_offset,
            result_offset,
            total,
        })
    }

    const fn abort_offset() -> usize {
        LINE
    }

    const fn rank_line_offset(rank: usize) -> usize {
        (2 + rank) * LINE
    }

    fn slot_offset(&self, set: usize, rank: usize) -> usize {
        self.slots_offset + (set * self.world_size + rank) * self.slot_stride
    }
}

/// A mapping of a region plus its layout; all pointer arithmetic lives here.
struct Mapping {
    map: MmapRaw,
    layout: Layout,
}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and writable.
    fn map(fd: RawFd, len: usize) -> Result<MmapRaw, CommError> {
        MmapOptions::new()
            .len(len)
            .map_raw(fd)
            .map_err(CommError::Map)
    }

    /// A reference to the control structure `T` at `offset`.
    fn at<T>(&self, offset: usize) -> &T {
        assert!(offset + size_of::<T>() <= self.map.len());
        // SAFETY: the range lies inside the mapping (checked above), which lives as long as
        // `self`. The mapping is page-aligned and every offset used is a multiple of LINE (128),
        // which satisfies the alignment of the atomics-only `#[repr(C)]` structs read here.
        // Those structs consist of `AtomicU64`s only: any bit pattern is valid, and shared
        // mutation by other threads and processes goes through atomic operations.
        unsafe { &*self.map.as_ptr().add(offset).cast::<T>() }
    }

    fn header(&self) -> &RegionHeader {
        self.at(0)
    }

    fn abort_flag(&self) -> &AtomicU64 {
        self.at(Layout::abort_offset())
    }

    fn rank_line(&self, rank: usize) -> &RankLine {
        self.at(Layout::rank_line_offset(rank))
    }

    fn slot_header(&self, set: usize, rank: usize) -> &SlotHeader {
        self.at(self.layout.slot_offset(set, rank))
    }

    /// Start of the data part of a slot (`slot_bytes` bytes, 128-byte aligned).
    fn slot_data(&self, set: usize, rank: usize) -> *mut u8 {
        let offset = self.layout.slot_offset(set, rank) + LINE;
        debug_assert!(offset + self.layout.slot_bytes <= self.map.len());
        // SAFETY: the offset lies inside the mapping (the layout was validated against it).
        unsafe { self.map.as_mut_ptr().add(offset) }
    }

    /// Start of the result area (`slot_bytes` bytes, 128-byte aligned).
    fn result_data(&self) -> *mut u8 {
        debug_assert!(self.layout.result_offset + self.layout.slot_bytes <= self.map.len());
        // SAFETY: the offset lies inside the mapping (the layout was validated against it).
        unsafe { self.map.as_mut_ptr().add(self.layout.result_offset) }
    }

    fn abort(&self) {
        self.abort_flag().store(1, Ordering::Release);
    }

    fn is_aborted(&self) -> bool {
        self.abort_flag().load(Ordering::Acquire) != 0
    }
}

/// Creates the anonymous, inheritable (no `FD_CLOEXEC`), sealable shared-memory file.
fn create_memfd() -> Result<OwnedFd, CommError> {
    // SAFETY: REGION_NAME is a valid NUL-terminated string; memfd_create has no other
    // preconditions and reports failure through its return value.
    let raw = unsafe { libc::memfd_create(REGION_NAME.as_ptr(), libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(CommError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sizes the file to `len` bytes and seals its size, so nobody can truncate it under a mapping.
fn size_and_seal(fd: &OwnedFd, len: usize) -> Result<(), CommError> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| CommError::Create(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `fd` is an open descriptor owned by the caller; ftruncate only reads its arguments.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(CommError::Create(io::Error::last_os_error()));
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: `fd` is an open memfd created with MFD_ALLOW_SEALING; F_ADD_SEALS takes an int.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(CommError::Create(io::Error::last_os_error()));
    }
    Ok(())
}

/// A file in `dir` that no name points to, open for reading and writing, mode 0600.
fn create_unnamed_file(dir: &std::path::Path) -> Result<OwnedFd, CommError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: io::Error| {
        CommError::Create(io::Error::new(
            e.kind(),
            format!(
                "cannot create the communicator's file in {}: {e}",
                dir.display()
            ),
        ))
    };
    let unnamed = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    let file = match unnamed {
        Ok(file) => file,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.kind() == io::ErrorKind::PermissionDenied =>
        {
            return Err(failed(e))
        }
        // The file system has no O_TMPFILE: a random name, removed as soon as it is open.
        Err(_) => {
            let path = dir.join(format!(".parallelformers-{:032x}", rand::random::<u128>()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(failed)?;
            std::fs::remove_file(&path).map_err(failed)?;
            file
        }
    };
    Ok(OwnedFd::from(file))
}

/// Allocates every page of the file now (`fallocate`), so that a lack of memory is an error
/// here, naming the size, instead of a `SIGBUS` in whichever process first touches a page.
fn reserve(fd: &OwnedFd, len: usize) -> Result<(), CommError> {
    let size = libc::off_t::try_from(len)
        .map_err(|_| CommError::Create(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `fd` is an open descriptor owned by the caller; fallocate only reads its arguments.
    if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, size) } != 0 {
        let error = io::Error::last_os_error();
        return Err(CommError::Create(io::Error::new(
            error.kind(),
            format!("cannot reserve {len} bytes of shared memory for the communicator: {error}"),
        )));
    }
    Ok(())
}

/// Size in bytes of the file behind `fd`.
fn file_size(fd: RawFd) -> Result<u64, CommError> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `stat` is valid for writing one `libc::stat`; fstat reports a bad descriptor
    // through its return value (EBADF) rather than touching memory.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return Err(CommError::Map(io::Error::last_os_error()));
    }
    // SAFETY: fstat returned 0, so it initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(u64::try_from(stat.st_size).unwrap_or(0))
}

/// The shared-memory region of one group, owned by the launcher.
///
/// Owns the descriptor (closed on drop; children keep their inherited copies) and a mapping
/// used to set the abort flag.
pub struct ShmRegion {
    fd: OwnedFd,
    mapping: Mapping,
}

impl ShmRegion {
    /// Creates a region for `world_size` ranks with `slot_bytes` bytes of data per rank and round
    /// (a positive multiple of 4; the crate uses [`DEFAULT_SLOT_BYTES`]).
    ///
    /// The region takes about `(2 * world_size + 1) * slot_bytes` bytes of memory, reserved up
    /// front: when memory is short, creation fails with the size it needs rather than a rank
    /// being killed by `SIGBUS` later.
    pub fn create(world_size: usize, slot_bytes: usize) -> Result<ShmRegion, CommError> {
        let layout = Layout::new(world_size, slot_bytes)?;
        let fd = create_memfd()?;
        size_and_seal(&fd, layout.total)?;
        ShmRegion::init(fd, layout)
    }

    /// Like [`ShmRegion::create`], backed by a file in `dir` instead of anonymous memory: for
    /// hosts where anonymous shared memory is scarce or unavailable. The file is created
    /// without a name (`O_TMPFILE`; where the file system lacks it, with a random name that is
    /// removed at once), readable and writable by this user only (mode 0600), so nothing is
    /// left in `dir` however the processes end.
    pub fn create_in(
        dir: &std::path::Path,
        world_size: usize,
        slot_bytes: usize,
    ) -> Result<ShmRegion, CommError> {
        let layout = Layout::new(world_size, slot_bytes)?;
        let fd = create_unnamed_file(dir)?;
        let len = libc::off_t::try_from(layout.total)
            .map_err(|_| CommError::Create(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: `fd` is an open descriptor we own; ftruncate only reads its arguments.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(CommError::Create(io::Error::last_os_error()));
        }
        ShmRegion::init(fd, layout)
    }

    /// Reserves the sized file's memory, maps it and writes the header.
    fn init(fd: OwnedFd, layout: Layout) -> Result<ShmRegion, CommError> {
        let (world_size, slot_bytes) = (layout.world_size, layout.slot_bytes);
        reserve(&fd, layout.total)?;
        let map = Mapping::map(fd.as_raw_fd(), layout.total)?;
        let mapping = Mapping { map, layout };
        let header = mapping.header();
        header.version.store(VERSION, Ordering::Relaxed);
        header
            .world_size
            .store(world_size as u64, Ordering::Relaxed);
        header
            .slot_bytes
            .store(slot_bytes as u64, Ordering::Relaxed);
        header
            .total_bytes
            .store(layout.total as u64, Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Release);
        Ok(ShmRegion { fd, mapping })
    }

    /// The descriptor of the region, to pass to [`ShmCommunicator::attach`] (in this process or,
    /// by number, in a child that inherited it). It stays owned by the region.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The number of ranks the region was created for.
    pub fn world_size(&self) -> usize {
        self.mapping.layout.world_size
    }

    /// The data capacity of one slot, in bytes.
    pub fn slot_bytes(&self) -> usize {
        self.mapping.layout.slot_bytes
    }

    /// The total size of the region, in bytes.
    pub fn size_bytes(&self) -> usize {
        self.mapping.layout.total
    }

    /// Aborts the group: every rank blocked in or entering a collective gets
    /// [`CommError::Aborted`]. Irreversible. Call it when a rank has died.
    pub fn abort(&self) {
        self.mapping.abort();
    }

    /// Whether the group has been aborted.
    pub fn is_aborted(&self) -> bool {
        self.mapping.is_aborted()
    }

    /// The heartbeat count of `rank` (see [`Heartbeat`]); it stops rising when the rank's
    /// process stops running.
    pub fn heartbeat(&self, rank: usize) -> u64 {
        match rank < self.world_size() {
            true => self
                .mapping
                .rank_line(rank)
                .heartbeat
                .load(Ordering::Relaxed),
            false => 0,
        }
    }
}

/// A rank's sign of life in its group's region: a thread of the rank raises the count
/// periodically, and the launcher that owns the region treats a count that stopped rising as a
/// rank that stopped answering (a stopped or frozen process).
pub struct Heartbeat {
    mapping: Mapping,
    rank: usize,
}

impl Heartbeat {
    /// Maps the region behind `fd` (inherited from the launcher) to beat as `rank`.
    pub fn attach(fd: RawFd, rank: usize, world_size: usize) -> Result<Self, CommError> {
        if rank >= world_size {
            return Err(CommError::InvalidRank { rank, world_size });
        }
        let mapping = ShmCommunicator::map_region(fd, world_size)?;
        Ok(Heartbeat { mapping, rank })
    }

    /// Raises the count once.
    pub fn beat(&self) {
        self.mapping
            .rank_line(self.rank)
            .heartbeat
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for ShmRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmRegion")
            .field("fd", &self.fd())
            .field("world_size", &self.world_size())
            .field("slot_bytes", &self.slot_bytes())
            .field("aborted", &self.is_aborted())
            .finish()
    }
}

/// Waits in two phases: spin for a while ([`SPIN_WINDOW`] or [`SHORT_SPIN_WINDOW`]), then sleep
/// with doubling intervals from [`FIRST_SLEEP`] up to [`MAX_SLEEP`].
///
/// There is deliberately no `yield_now` phase between them: under Linux's fair scheduler a
/// yielding thread queues behind every other runnable thread on its CPU for up to a whole time
/// slice (milliseconds), so with any CPU-bound neighbour (a compiler, another test, a rank's own
/// compute threads) each barrier would cost a time slice. Measured on 2 cores with two busy
/// processes, spin-yield-sleep made a 3 MB all-reduce of two ranks 2.7x slower (4.0 ms against
/// 1.5 ms) and this module's tests 6x slower than spin-sleep; without contention the two were
/// equally fast.
struct Backoff {
    spin_window: Duration,
    start: Option<Instant>,
    sleep: Duration,
}

impl Backoff {
    fn new(spin_window: Duration) -> Self {
        Self {
            spin_window,
            start: None,
            sleep: FIRST_SLEEP,
        }
    }

    /// The spin window for a group of `world_size` ranks on this machine.
    fn spin_window_for(world_size: usize) -> Duration {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if world_size <= cpus {
            SPIN_WINDOW
        } else {
            SHORT_SPIN_WINDOW
        }
    }

    /// Waits a little; call repeatedly while the condition is not met.
    fn snooze(&mut self) {
        let start = *self.start.get_or_insert_with(Instant::now);
        if start.elapsed() < self.spin_window {
            for _ in 0..8 {
                std::hint::spin_loop();
            }
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(MAX_SLEEP);
        }
    }
}

/// Number of rounds needed to move `len` items `capacity` at a time (at least one, so that even
/// empty calls check that all ranks agree).
fn round_count(len: usize, capacity: usize) -> usize {
    len.div_ceil(capacity).max(1)
}

/// The items of round `round` when moving `len` items `capacity` at a time.
fn round_range(len: usize, round: usize, capacity: usize) -> Range<usize> {
    let start = round.saturating_mul(capacity).min(len);
    start..start.saturating_add(capacity).min(len)
}

/// The part of a reduction of `len` elements that `rank` of `world_size` sums, in whole cache
/// lines so that neighbouring ranks do not write to the same line.
fn reduce_share(len: usize, rank: usize, world_size: usize) -> Range<usize> {
    let units = len.div_ceil(SHARE_UNIT);
    let first = units * rank / world_size;
    let last = units * (rank + 1) / world_size;
    (first * SHARE_UNIT).min(len)..(last * SHARE_UNIT).min(len)
}

/// One rank's endpoint of a [`ShmRegion`].
///
/// Not `Sync`: a rank issues its collectives from one thread at a time. Several communicators
/// (one per rank) may live in one process; each has its own mapping.
pub struct ShmCommunicator {
    mapping: Mapping,
    rank: usize,
    /// Barriers this rank has arrived at (mirrors its epoch counter in the region).
    epoch: Cell<u64>,
    /// Rounds this rank has started; its parity selects the slot set.
    round: Cell<u64>,
    /// See [`DIRECT_REDUCE_ELEMENTS`]; must be the same on every rank (tests change it).
    direct_reduce_limit: usize,
    /// How long waits spin before sleeping (see [`Backoff`]).
    spin_window: Duration,
}

impl ShmCommunicator {
    /// Attaches to the region behind `fd` as `rank` of `world_size`.
    ///
    /// The descriptor is only **borrowed**: attach maps the file and keeps the mapping, not the
    /// descriptor, so the caller may close `fd` afterwards (a child may close its inherited copy)
    /// and the mapping stays valid. Each call makes its own mapping, so several ranks can attach
    /// in one process. The size of the file and the world size recorded in the region are
    /// validated, and each rank can be attached only once per region.
    pub fn attach(fd: RawFd, rank: usize, world_size: usize) -> Result<Self, CommError> {
        if world_size == 0 {
            return Err(CommError::InvalidWorldSize { world_size });
        }
        if rank >= world_size {
            return Err(CommError::InvalidRank { rank, world_size });
        }
        let mapping = Self::map_region(fd, world_size)?;
        let claimed = mapping.rank_line(rank).claimed.compare_exchange(
            0,
            1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if claimed.is_err() {
            return Err(CommError::RankInUse { rank });
        }
        Ok(Self {
            mapping,
            rank,
            epoch: Cell::new(0),
            round: Cell::new(0),
            direct_reduce_limit: DIRECT_REDUCE_ELEMENTS,
            spin_window: Backoff::spin_window_for(world_size),
        })
    }

    /// Maps the whole file behind `fd` and checks that it holds a region for `world_size` ranks.
    fn map_region(fd: RawFd, world_size: usize) -> Result<Mapping, CommError> {
        let size = file_size(fd)?;
        let header_bytes = LINE as u64;
        if size < header_bytes {
            return Err(CommError::RegionTooSmall {
                size,
                required: header_bytes,
            });
        }
        let len = usize::try_from(size).map_err(|_| CommError::NotARegion)?;
        let map = Mapping::map(fd, len)?;
        // A provisional layout that covers just the header, to read the real one from it.
        let probe = Mapping {
            map,
            layout: Layout::new(1, size_of::<f32>())?,
        };
        let header = probe.header();
        if header.magic.load(Ordering::Acquire) != MAGIC
            || header.version.load(Ordering::Relaxed) != VERSION
        {
            return Err(CommError::NotARegion);
        }
        let found = usize::try_from(header.world_size.load(Ordering::Relaxed))
            .map_err(|_| CommError::NotARegion)?;
        if found != world_size {
            return Err(CommError::WorldSizeMismatch {
                expected: world_size,
                found,
            });
        }
        let slot_bytes = usize::try_from(header.slot_bytes.load(Ordering::Relaxed))
            .map_err(|_| CommError::NotARegion)?;
        let layout = Layout::new(world_size, slot_bytes).map_err(|_| CommError::NotARegion)?;
        if header.total_bytes.load(Ordering::Relaxed) != layout.total as u64 {
            return Err(CommError::NotARegion);
        }
        if len < layout.total {
            return Err(CommError::RegionTooSmall {
                size,
                required: layout.total as u64,
            });
        }
        Ok(Mapping {
            map: probe.map,
            layout,
        })
    }

    /// Sets how long waits spin before sleeping. A rank pinned to a core of its own should
    /// spin long (sleeping costs a wake-up latency at every collective); ranks sharing cores
    /// should spin briefly so they don't steal the CPU from the ranks they wait for.
    pub fn set_spin_window(&mut self, window: Duration) {
        self.spin_window = window;
    }

    /// Aborts the whole group (see [`ShmRegion::abort`]); for a rank that cannot go on.
    pub fn abort(&self) {
        self.mapping.abort();
    }

    /// Whether the group has been aborted.
    pub fn is_aborted(&self) -> bool {
        self.mapping.is_aborted()
    }

    fn world(&self) -> usize {
        self.mapping.layout.world_size
    }

    /// Fails fast once the group is aborted.
    fn ensure_live(&self) -> Result<(), CommError> {
        if self.is_aborted() {
            Err(CommError::Aborted)
        } else {
            Ok(())
        }
    }

    /// Starts a round and returns the slot set it uses.
    fn next_set(&self) -> usize {
        let round = self.round.get();
        self.round.set(round + 1);
        (round & 1) as usize
    }

    /// Records in this rank's slot header what it called (read by every rank after the barrier).
    fn publish(&self, set: usize, op: u64, len: usize, aux: usize) {
        let header = self.mapping.slot_header(set, self.rank);
        header.op.store(op, Ordering::Relaxed);
        header.len.store(len as u64, Ordering::Relaxed);
        header.aux.store(aux as u64, Ordering::Relaxed);
    }

    /// What `rank` published in `set`: `(op, len, aux)`.
    fn published(&self, set: usize, rank: usize) -> (u64, usize, usize) {
        let header = self.mapping.slot_header(set, rank);
        let to_usize = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        (
            header.op.load(Ordering::Relaxed),
            to_usize(header.len.load(Ordering::Relaxed)),
            to_usize(header.aux.load(Ordering::Relaxed)),
        )
    }

    /// Copies `piece` (at most `slot_bytes` bytes) into this rank's slot of `set`.
    fn write_f32(&self, set: usize, piece: &[f32]) {
        assert!(size_of_val(piece) <= self.mapping.layout.slot_bytes);
        let slot = self.mapping.slot_data(set, self.rank).cast::<f32>();
        // SAFETY: the slot holds `slot_bytes` bytes (checked above) and is 128-byte aligned. Only
        // this rank writes it, and at this point of the protocol nobody reads it (it was last
        // read two rounds ago, before every rank passed the previous round's barrier). A private
        // slice never overlaps the shared mapping.
        unsafe { ptr::copy_nonoverlapping(piece.as_ptr(), slot, piece.len()) }
    }

    /// Copies `piece` (at most `slot_bytes` bytes) into this rank's slot of `set`.
    fn write_bytes(&self, set: usize, piece: &[u8]) {
        assert!(piece.len() <= self.mapping.layout.slot_bytes);
        let slot = self.mapping.slot_data(set, self.rank);
        // SAFETY: as for `write_f32`.
        unsafe { ptr::copy_nonoverlapping(piece.as_ptr(), slot, piece.len()) }
    }

    /// Arrives at the next barrier and waits until every other rank has arrived too.
    fn sync(&self) -> Result<(), CommError> {
        let target = self.epoch.get() + 1;
        self.epoch.set(target);
        self.mapping
            .rank_line(self.rank)
            .epoch
            .store(target, Ordering::Release);
        let mut backoff = Backoff::new(self.spin_window);
        for peer in (0..self.world()).filter(|&peer| peer != self.rank) {
            let epoch = &self.mapping.rank_line(peer).epoch;
            while epoch.load(Ordering::Acquire) < target {
                self.ensure_live()?;
                backoff.snooze();
            }
        }
        Ok(())
    }

    /// Checks that every rank published the same operation as rank 0 (and hence as this rank,
    /// which published `op`); the verdict is the same on every rank.
    fn check_same_op(&self, set: usize, op: u64) -> Result<(), CommError> {
        let (expected, _, _) = self.published(set, 0);
        for rank in 1..self.world() {
            let (got, _, _) = self.published(set, rank);
            if got != expected {
                return Err(CommError::CollectiveMismatch {
                    rank,
                    expected: op_name(expected),
                    got: op_name(got),
                });
            }
        }
        debug_assert_eq!(expected, op);
        Ok(())
    }

    /// The element ranges of every rank's part in the concatenation, from the published lengths.
    fn published_parts(&self, set: usize) -> Vec<Range<usize>> {
        let mut start = 0usize;
        (0..self.world())
            .map(|rank| {
                let (_, len, _) = self.published(set, rank);
                let part = start..start.saturating_add(len);
                start = part.end;
                part
            })
            .collect()
    }

    /// Checks that every rank published the same length; the verdict is the same on every rank.
    fn check_same_len(&self, set: usize) -> Result<(), CommError> {
        let (_, expected, _) = self.published(set, 0);
        for rank in 1..self.world() {
            let (_, got, _) = self.published(set, rank);
            if got != expected {
                return Err(CommError::LengthMismatch {
                    rank,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }

    /// Checks that every rank published the same, valid root.
    fn check_same_root(&self, set: usize) -> Result<(), CommError> {
        let world_size = self.world();
        for rank in 0..world_size {
            let (_, _, root) = self.published(set, rank);
            if root >= world_size {
                return Err(CommError::InvalidRoot { root, world_size });
            }
        }
        let (_, _, expected) = self.published(set, 0);
        for rank in 1..world_size {
            let (_, _, got) = self.published(set, rank);
            if got != expected {
                return Err(CommError::RootMismatch {
                    rank,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }

    /// Sums this rank's share of the first `len` elements of every slot of `set`, in rank order,
    /// into the result area.
    fn reduce_share_into_result(&self, set: usize, len: usize) {
        let world = self.world();
        let share = reduce_share(len, self.rank, world);
        let result = self.mapping.result_data().cast::<f32>();
        let mut start = share.start;
        while start < share.end {
            let n = REDUCE_BLOCK.min(share.end - start);
            // SAFETY: `start + n <= len <= slot_bytes / 4`, so the block lies inside the result
            // area, which is 128-byte aligned. Only this rank writes this share of it, between
            // the two barriers of the round, while no rank reads it.
            let out = unsafe { slice::from_raw_parts_mut(result.add(start), n) };
            let input = |rank: usize| -> &[f32] {
                let base = self.mapping.slot_data(set, rank).cast::<f32>();
                // SAFETY: the block lies inside the slot (as above). Every rank wrote its slot
                // before the first barrier of the round (whose acquire made it visible) and
                // rewrites it only two rounds later, so nobody writes it while it is read here.
                unsafe { slice::from_raw_parts(base.add(start), n) }
            };
            sum_in_rank_order(out, world, input);
            start += n;
        }
    }

    /// Sums the first `out.len()` elements of every slot of `set`, in rank order, into `out`
    /// (every rank sums everything: no second barrier, for small pieces).
    fn reduce_all_into(&self, set: usize, out: &mut [f32]) {
        let len = out.len();
        assert!(size_of_val(out) <= self.mapping.layout.slot_bytes);
        let input = |rank: usize| -> &[f32] {
            let base = self.mapping.slot_data(set, rank).cast::<f32>();
            // SAFETY: `len` elements lie inside the slot (checked above). Every rank wrote its
            // slot before the round's barrier (whose acquire made it visible) and rewrites it
            // only two rounds later, after this rank has arrived at its next barrier.
            unsafe { slice::from_raw_parts(base, len) }
        };
        sum_in_rank_order(out, self.world(), input);
    }

    /// Copies the first `out.len()` elements of the result area into `out`.
    fn read_result(&self, out: &mut [f32]) {
        assert!(size_of_val(out) <= self.mapping.layout.slot_bytes);
        let result = self.mapping.result_data().cast::<f32>();
        // SAFETY: `out.len() <= slot_bytes / 4` elements lie inside the result area, which was
        // completed before the second barrier of the round and is not written again before this
        // rank arrives at its next barrier.
        unsafe { ptr::copy_nonoverlapping(result, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `out.len()` elements from the start of `rank`'s slot of `set`.
    fn read_slot_f32(&self, set: usize, rank: usize, out: &mut [f32]) {
        assert!(size_of_val(out) <= self.mapping.layout.slot_bytes);
        let base = self.mapping.slot_data(set, rank).cast::<f32>();
        // SAFETY: the range lies inside the slot (checked by the callers' round arithmetic); the
        // slot was written before the round's barrier and is not rewritten before this rank
        // arrives at its next barrier.
        unsafe { ptr::copy_nonoverlapping(base, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `out.len()` bytes from the start of `rank`'s slot of `set`.
    fn read_slot_bytes(&self, set: usize, rank: usize, out: &mut [u8]) {
        assert!(out.len() <= self.mapping.layout.slot_bytes);
        // SAFETY: as for `read_slot_f32`.
        unsafe {
            ptr::copy_nonoverlapping(
                self.mapping.slot_data(set, rank),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Copies every rank's piece of round `round` into its place in `out`.
    fn gather_round(&self, set: usize, round: usize, parts: &[Range<usize>], out: &mut [f32]) {
        let capacity = self.mapping.layout.slot_bytes / size_of::<f32>();
        for (rank, part) in parts.iter().enumerate() {
            let piece = round_range(part.len(), round, capacity);
            if !piece.is_empty() {
                let dst = &mut out[part.start + piece.start..part.start + piece.end];
                self.read_slot_f32(set, rank, dst);
            }
        }
    }
}

/// `out[i] = input(0)[i] + input(1)[i] + ... + input(world - 1)[i]`, summed left to right.
fn sum_in_rank_order<'a>(out: &mut [f32], world: usize, input: impl Fn(usize) -> &'a [f32]) {
    if world == 1 {
        out.copy_from_slice(input(0));
        return;
    }
    for ((o, a), b) in out.iter_mut().zip(input(0)).zip(input(1)) {
        *o = a + b;
    }
    for rank in 2..world {
        for (o, x) in out.iter_mut().zip(input(rank)) {
            *o += x;
        }
    }
}

impl Communicator for ShmCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.ensure_live()?;
        let capacity = self.mapping.layout.slot_bytes / size_of::<f32>();
        let len = buf.len();
        for round in 0..round_count(len, capacity) {
            let piece = &mut buf[round_range(len, round, capacity)];
            let set = self.next_set();
            if round == 0 {
                self.publish(set, OP_ALL_REDUCE, len, 0);
            }
            self.write_f32(set, piece);
            self.sync()?;
            if round == 0 {
                self.check_same_op(set, OP_ALL_REDUCE)?;
                self.check_same_len(set)?;
            }
            if piece.len() * self.world() <= self.direct_reduce_limit {
                self.reduce_all_into(set, piece);
            } else {
                self.reduce_share_into_result(set, piece.len());
                self.sync()?;
                self.read_result(piece);
            }
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        self.ensure_live()?;
        let capacity = self.mapping.layout.slot_bytes / size_of::<f32>();
        let set = self.next_set();
        self.publish(set, OP_ALL_GATHER, local.len(), 0);
        self.write_f32(set, &local[round_range(local.len(), 0, capacity)]);
        self.sync()?;
        self.check_same_op(set, OP_ALL_GATHER)?;
        let parts = self.published_parts(set);
        let total = parts.last().map_or(0, |part| part.end);
        let longest = parts.iter().map(ExactSizeIterator::len).max().unwrap_or(0);
        let mut out = vec![0.0f32; total];
        self.gather_round(set, 0, &parts, &mut out);
        for round in 1..round_count(longest, capacity) {
            let set = self.next_set();
            self.write_f32(set, &local[round_range(local.len(), round, capacity)]);
            self.sync()?;
            self.gather_round(set, round, &parts, &mut out);
        }
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.ensure_live()?;
        let capacity = self.mapping.layout.slot_bytes;
        let len = buf.len();
        let is_root = root == self.rank;
        for round in 0..round_count(len, capacity) {
            let piece = &mut buf[round_range(len, round, capacity)];
            let set = self.next_set();
            if round == 0 {
                self.publish(set, OP_BROADCAST, len, root);
            }
            if is_root {
                self.write_bytes(set, piece);
            }
            self.sync()?;
            if round == 0 {
                self.check_same_op(set, OP_BROADCAST)?;
                self.check_same_root(set)?;
                self.check_same_len(set)?;
            }
            if !is_root {
                self.read_slot_bytes(set, root, piece);
            }
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.ensure_live()?;
        let set = self.next_set();
        self.publish(set, OP_BARRIER, 0, 0);
        self.sync()?;
        self.check_same_op(set, OP_BARRIER)
    }
}

impl fmt::Debug for ShmCommunicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world())
            .field("slot_bytes", &self.mapping.layout.slot_bytes)
            .field("aborted", &self.is_aborted())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;
    use std::thread;

    /// Aborts the group when a rank's test body panics, so the other ranks fail instead of
    /// waiting forever for it.
    struct AbortOnPanic<'a>(&'a ShmCommunicator);

    impl Drop for AbortOnPanic<'_> {
        fn drop(&mut self) {
            if thread::panicking() {
                self.0.abort();
            }
        }
    }

    /// The ways of summing an all-reduce: the automatic choice, and each path forced.
    const REDUCE_MODES: [(&str, usize); 3] = [
        ("automatic", DIRECT_REDUCE_ELEMENTS),
        ("direct", usize::MAX),
        ("reduce-scatter", 0),
    ];

    /// Creates a region and runs `body` on one thread per rank, each with its own attached
    /// communicator using `direct_reduce_limit`; returns the results in rank order.
    fn with_ranks_using<T: Send>(
        world: usize,
        slot_bytes: usize,
        direct_reduce_limit: usize,
        body: impl Fn(&ShmCommunicator) -> T + Sync,
    ) -> Vec<T> {
        let region = ShmRegion::create(world, slot_bytes).expect("create region");
        let fd = region.fd();
        let body = &body;
        thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    scope.spawn(move || {
                        let mut comm = ShmCommunicator::attach(fd, rank, world).expect("attach");
                        comm.direct_reduce_limit = direct_reduce_limit;
                        let _guard = AbortOnPanic(&comm);
                        body(&comm)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("a rank thread panicked"))
                .collect()
        })
    }

    /// [`with_ranks_using`] with the default choice of reduction path.
    fn with_ranks<T: Send>(
        world: usize,
        slot_bytes: usize,
        body: impl Fn(&ShmCommunicator) -> T + Sync,
    ) -> Vec<T> {
        with_ranks_using(world, slot_bytes, DIRECT_REDUCE_ELEMENTS, body)
    }

    /// Small integers (exactly representable, sums exact in any order) that differ per rank.
    fn integer_input(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((rank * 7919 + i * 31) % 1000) as f32)
            .collect()
    }

    /// The exact element-wise sum of `integer_input` over `world` ranks.
    fn integer_sum(world: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (0..world)
                    .map(|rank| (rank * 7919 + i * 31) % 1000)
                    .sum::<usize>() as f32
            })
            .collect()
    }

    /// Pseudo-random floats of widely varying magnitude, so the sum depends on the order.
    fn rough_input(rank: usize, len: usize) -> Vec<f32> {
        let mut state =
            0x9E37_79B9_7F4A_7C15u64 ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let mantissa = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let exponent = ((state >> 8) % 24) as i32 - 12;
                mantissa * 2f32.powi(exponent)
            })
            .collect()
    }

    /// Sums `inputs` element-wise in the order the inputs are given.
    fn ordered_sum<'a>(mut inputs: impl Iterator<Item = &'a Vec<f32>>) -> Vec<f32> {
        let mut acc = inputs.next().expect("at least one input").clone();
        for input in inputs {
            for (a, x) in acc.iter_mut().zip(input) {
                *a += x;
            }
        }
        acc
    }

    /// The bit patterns of `values`, for exact comparisons.
    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn all_reduce_sums_exactly_for_every_world_size_from_one_to_eight() {
        let cases = [
            (28, 0),
            (28, 1),
            (28, 3),
            (28, 767),
            (4096, 1000),
            (4096, 3000),
        ];
        for (mode, limit) in REDUCE_MODES {
            for world in 1..=8 {
                for (slot_bytes, len) in cases {
                    let results = with_ranks_using(world, slot_bytes, limit, |comm| {
                        let mut buf = integer_input(comm.rank(), len);
                        comm.all_reduce_sum(&mut buf).expect("all_reduce");
                        buf
                    });
                    let expected = integer_sum(world, len);
                    for (rank, result) in results.iter().enumerate() {
                        assert!(
                            result == &expected,
                            "{mode}, world {world}, slot {slot_bytes}, len {len}, rank {rank}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn all_reduce_is_bit_identical_to_a_fixed_rank_order_sum_on_every_rank() {
        for world in [2, 3, 5, 8] {
            let len = 4099;
            let inputs: Vec<Vec<f32>> = (0..world).map(|rank| rough_input(rank, len)).collect();
            let expected = ordered_sum(inputs.iter());
            if world >= 3 {
                let reversed = ordered_sum(inputs.iter().rev());
                let differing = bits(&expected)
                    .iter()
                    .zip(bits(&reversed))
                    .filter(|(a, b)| **a != *b)
                    .count();
                assert!(
                    differing > 0,
                    "test data must make the summation order observable"
                );
            }
            for (mode, limit) in REDUCE_MODES {
                let results = with_ranks_using(world, 1024, limit, |comm| {
                    let mut buf = inputs[comm.rank()].clone();
                    comm.all_reduce_sum(&mut buf).expect("all_reduce");
                    buf
                });
                for (rank, result) in results.iter().enumerate() {
                    assert!(
                        bits(result) == bits(&expected),
                        "{mode}, world {world}, rank {rank}"
                    );
                }
            }
        }
    }

    #[test]
    fn all_reduce_of_a_million_and_three_floats_crosses_many_slot_boundaries() {
        let world = 3;
        let len = 1_000_003;
        let results = with_ranks(world, 64 * 1024 + 4, |comm| {
            let mut buf = integer_input(comm.rank(), len);
            comm.all_reduce_sum(&mut buf).expect("all_reduce");
            buf
        });
        let expected = integer_sum(world, len);
        for result in &results {
            assert!(result == &expected);
        }
    }

    #[test]
    fn all_reduce_of_several_megabytes_works_with_the_default_slot_size() {
        for world in [2, 4] {
            let len = (10 << 20) / 4 + 5;
            let results = with_ranks(world, DEFAULT_SLOT_BYTES, |comm| {
                let mut buf = integer_input(comm.rank(), len);
                comm.all_reduce_sum(&mut buf).expect("all_reduce");
                buf
            });
            let expected = integer_sum(world, len);
            for result in &results {
                assert!(result == &expected, "world {world}");
            }
        }
    }

    #[test]
    fn five_thousand_small_all_reduces_in_a_row_complete_without_deadlock() {
        for (world, len) in [(2, 768), (8, 64)] {
            let results = with_ranks(world, DEFAULT_SLOT_BYTES, |comm| {
                let mut buf = vec![0.0f32; len];
                for step in 0..5000 {
                    buf.fill((comm.rank() + step) as f32);
                    comm.all_reduce_sum(&mut buf).expect("all_reduce");
                    let expected = (0..world).map(|rank| rank + step).sum::<usize>() as f32;
                    assert!(buf.iter().all(|&v| v == expected), "step {step}");
                }
                buf
            });
            assert_eq!(results.len(), world);
        }
    }

    #[test]
    fn all_gather_concatenates_uneven_and_empty_parts_in_rank_order() {
        let part_len = |rank: usize| [3, 0, 10, 1, 0, 22, 7, 15][rank];
        let part = |rank: usize| -> Vec<f32> {
            (0..part_len(rank))
                .map(|i| (rank * 100 + i) as f32)
                .collect()
        };
        for world in 1..=8 {
            for slot_bytes in [4, 28, 4096] {
                let results = with_ranks(world, slot_bytes, |comm| {
                    comm.all_gather(&part(comm.rank())).expect("all_gather")
                });
                let expected: Vec<f32> = (0..world).flat_map(part).collect();
                for (rank, result) in results.iter().enumerate() {
                    assert_eq!(
                        result, &expected,
                        "world {world}, slot {slot_bytes}, rank {rank}"
                    );
                }
            }
        }
    }

    #[test]
    fn all_gather_of_only_empty_parts_returns_an_empty_vector_on_every_rank() {
        let results = with_ranks(4, 64, |comm| comm.all_gather(&[]).expect("all_gather"));
        assert!(results.iter().all(Vec::is_empty));
    }

    #[test]
    fn all_gather_of_parts_much_larger_than_a_slot_takes_several_rounds() {
        let lens = [10_000, 0, 3, 20_001];
        let part = |rank: usize| -> Vec<f32> {
            (0..lens[rank])
                .map(|i| (rank * 1_000_000 + i) as f32)
                .collect()
        };
        let results = with_ranks(4, 4096, |comm| {
            comm.all_gather(&part(comm.rank())).expect("all_gather")
        });
        let expected: Vec<f32> = (0..4).flat_map(part).collect();
        for result in &results {
            assert!(result == &expected);
        }
    }

    #[test]
    fn broadcast_copies_the_root_buffer_to_every_rank_from_every_root() {
        let len = 1001;
        for world in 1..=8 {
            let results = with_ranks(world, 64, |comm| {
                (0..world)
                    .map(|root| {
                        let mut buf: Vec<u8> = if comm.rank() == root {
                            (0..len).map(|i| (i * 7 + root * 13) as u8).collect()
                        } else {
                            vec![0xAA; len]
                        };
                        comm.broadcast(&mut buf, root).expect("broadcast");
                        buf
                    })
                    .collect::<Vec<_>>()
            });
            for (rank, per_root) in results.iter().enumerate() {
                for (root, buf) in per_root.iter().enumerate() {
                    let expected: Vec<u8> = (0..len).map(|i| (i * 7 + root * 13) as u8).collect();
                    assert_eq!(buf, &expected, "world {world}, root {root}, rank {rank}");
                }
            }
        }
    }

    #[test]
    fn broadcast_of_zero_bytes_succeeds_on_every_rank() {
        let results = with_ranks(3, 64, |comm| comm.broadcast(&mut [], 2));
        assert!(results.iter().all(Result::is_ok));
    }

    #[test]
    fn broadcast_with_an_out_of_range_root_fails_on_every_rank_and_the_group_stays_usable() {
        let results = with_ranks(3, 64, |comm| {
            let root = if comm.rank() == 1 { 3 } else { 0 };
            let err = comm
                .broadcast(&mut [1, 2, 3], root)
                .expect_err("invalid root");
            let mut buf = [comm.rank() as u8; 3];
            comm.broadcast(&mut buf, 2)
                .expect("valid broadcast afterwards");
            (err, buf)
        });
        for (err, buf) in results {
            assert!(
                matches!(
                    err,
                    CommError::InvalidRoot {
                        root: 3,
                        world_size: 3
                    }
                ),
                "{err}"
            );
            assert_eq!(buf, [2, 2, 2]);
        }
    }

    #[test]
    fn broadcast_with_disagreeing_roots_fails_on_every_rank() {
        let results = with_ranks(3, 64, |comm| {
            let root = if comm.rank() == 2 { 1 } else { 0 };
            comm.broadcast(&mut [0u8; 4], root)
                .expect_err("root mismatch")
        });
        for err in results {
            assert!(
                matches!(
                    err,
                    CommError::RootMismatch {
                        rank: 2,
                        expected: 0,
                        got: 1
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn broadcast_with_disagreeing_lengths_fails_on_every_rank() {
        let results = with_ranks(2, 64, |comm| {
            let mut buf = vec![0u8; 10 + comm.rank()];
            comm.broadcast(&mut buf, 0).expect_err("length mismatch")
        });
        for err in results {
            assert!(
                matches!(
                    err,
                    CommError::LengthMismatch {
                        rank: 1,
                        expected: 10,
                        got: 11
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn all_reduce_with_disagreeing_lengths_fails_on_every_rank_and_the_group_stays_usable() {
        let results = with_ranks(4, 28, |comm| {
            let mut wrong = vec![1.0f32; if comm.rank() == 2 { 99 } else { 100 }];
            let err = comm
                .all_reduce_sum(&mut wrong)
                .expect_err("length mismatch");
            let mut buf = vec![1.0f32; 50];
            comm.all_reduce_sum(&mut buf)
                .expect("all_reduce afterwards");
            (err, buf)
        });
        for (err, buf) in results {
            assert!(
                matches!(
                    err,
                    CommError::LengthMismatch {
                        rank: 2,
                        expected: 100,
                        got: 99
                    }
                ),
                "{err}"
            );
            assert_eq!(buf, vec![4.0f32; 50]);
        }
    }

    #[test]
    fn different_collectives_at_the_same_step_fail_on_every_rank() {
        let results = with_ranks(3, 64, |comm| {
            let err = match comm.rank() {
                0 => comm.all_reduce_sum(&mut [1.0; 20]).expect_err("mismatch"),
                1 => comm.barrier().expect_err("mismatch"),
                _ => comm.all_gather(&[1.0; 500]).expect_err("mismatch"),
            };
            comm.barrier().expect("barrier afterwards");
            err
        });
        for err in results {
            assert!(
                matches!(
                    err,
                    CommError::CollectiveMismatch {
                        rank: 1,
                        expected: "all_reduce_sum",
                        got: "barrier"
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn barrier_returns_only_after_every_rank_has_arrived() {
        let world = 6;
        let arrived = AtomicUsize::new(0);
        with_ranks(world, 64, |comm| {
            for step in 1..=200 {
                if (comm.rank() + step) % world == 0 {
                    thread::yield_now();
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                comm.barrier().expect("barrier");
                assert!(
                    arrived.load(Ordering::SeqCst) >= step * world,
                    "step {step}"
                );
                comm.barrier().expect("second barrier");
            }
        });
        assert_eq!(arrived.load(Ordering::SeqCst), 200 * world);
    }

    #[test]
    fn a_slow_rank_only_delays_the_others() {
        let delay = Duration::from_millis(200);
        let results = with_ranks(4, 64, |comm| {
            comm.barrier().expect("barrier");
            let start = Instant::now();
            if comm.rank() == 3 {
                thread::sleep(delay);
            }
            let mut buf = vec![comm.rank() as f32; 100];
            comm.all_reduce_sum(&mut buf).expect("all_reduce");
            (buf, start.elapsed())
        });
        for (buf, elapsed) in results {
            assert_eq!(buf, vec![6.0f32; 100]);
            // The others left the first barrier at most a sleep interval (or a time slice)
            // before or after rank 3.
            assert!(elapsed >= delay - Duration::from_millis(20), "{elapsed:?}");
            assert!(elapsed < delay + Duration::from_millis(500), "{elapsed:?}");
        }
    }

    #[test]
    fn abort_wakes_ranks_blocked_in_a_collective_within_a_second() {
        let region = ShmRegion::create(4, 1024).expect("create region");
        let started = Barrier::new(4);
        let results = thread::scope(|scope| {
            // Ranks 0, 1 and 2 enter different collectives; rank 3 never attaches.
            let ranks: Vec<_> = (0..3)
                .map(|rank| {
                    let (fd, started) = (region.fd(), &started);
                    scope.spawn(move || {
                        let comm = ShmCommunicator::attach(fd, rank, 4).expect("attach");
                        started.wait();
                        let begin = Instant::now();
                        let result = match rank {
                            0 => comm.all_reduce_sum(&mut [1.0; 10]),
                            1 => comm.all_gather(&[1.0]).map(drop),
                            _ => comm.barrier(),
                        };
                        (result, begin.elapsed())
                    })
                })
                .collect();
            started.wait();
            thread::sleep(Duration::from_millis(300));
            let aborted_at = Instant::now();
            region.abort();
            let results: Vec<_> = ranks
                .into_iter()
                .map(|rank| rank.join().expect("rank thread panicked"))
                .collect();
            (results, aborted_at.elapsed())
        });
        let (results, since_abort) = results;
        assert!(region.is_aborted());
        assert!(since_abort < Duration::from_secs(1), "{since_abort:?}");
        for (result, elapsed) in results {
            assert!(matches!(result, Err(CommError::Aborted)), "{result:?}");
            assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
        }
    }

    #[test]
    fn every_collective_fails_at_once_after_an_abort() {
        let region = ShmRegion::create(2, 64).expect("create region");
        let comm = ShmCommunicator::attach(region.fd(), 0, 2).expect("attach");
        assert!(!comm.is_aborted());
        comm.abort();
        assert!(region.is_aborted());
        assert!(matches!(
            comm.all_reduce_sum(&mut [1.0]),
            Err(CommError::Aborted)
        ));
        assert!(matches!(comm.all_gather(&[1.0]), Err(CommError::Aborted)));
        assert!(matches!(
            comm.broadcast(&mut [1], 0),
            Err(CommError::Aborted)
        ));
        assert!(matches!(comm.barrier(), Err(CommError::Aborted)));
    }

    /// A deterministic pseudo-random stream for the interleaving test.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, bound: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % bound as u64) as usize
        }
    }

    #[test]
    fn interleaved_collectives_of_every_kind_give_correct_results_under_timing_noise() {
        let runs = [2, 3, 5]
            .into_iter()
            .flat_map(|world| REDUCE_MODES.map(|(_, limit)| (world, limit)));
        for (world, limit) in runs {
            with_ranks_using(world, 64, limit, |comm| {
                let rank = comm.rank();
                let mut plan = Lcg(42); // the same on every rank
                let mut noise = Lcg(1000 + rank as u64); // different per rank
                for step in 0..400 {
                    match noise.next(8) {
                        0 => thread::yield_now(),
                        1 => thread::sleep(Duration::from_micros(50)),
                        _ => {}
                    }
                    let len = plan.next(70);
                    match plan.next(4) {
                        0 => {
                            let mut buf: Vec<f32> =
                                (0..len).map(|i| (rank * 1000 + i + step) as f32).collect();
                            comm.all_reduce_sum(&mut buf).expect("all_reduce");
                            let expected: Vec<f32> = (0..len)
                                .map(|i| {
                                    (0..world).map(|r| r * 1000 + i + step).sum::<usize>() as f32
                                })
                                .collect();
                            assert_eq!(buf, expected, "step {step}");
                        }
                        1 => {
                            let mine = (len + rank * 3) % 40;
                            let part: Vec<f32> =
                                (0..mine).map(|i| (rank * 100 + i) as f32).collect();
                            let gathered = comm.all_gather(&part).expect("all_gather");
                            let expected: Vec<f32> = (0..world)
                                .flat_map(|r| {
                                    (0..(len + r * 3) % 40).map(move |i| (r * 100 + i) as f32)
                                })
                                .collect();
                            assert_eq!(gathered, expected, "step {step}");
                        }
                        2 => {
                            let root = step % world;
                            let mut buf = vec![rank as u8; len * 3];
                            comm.broadcast(&mut buf, root).expect("broadcast");
                            assert_eq!(buf, vec![root as u8; len * 3], "step {step}");
                        }
                        _ => comm.barrier().expect("barrier"),
                    }
                }
            });
        }
    }

    #[test]
    fn ranks_can_be_used_through_the_communicator_trait_object() {
        let results = with_ranks(2, 64, |comm| {
            let dynamic: &dyn Communicator = comm;
            let mut buf = [dynamic.rank() as f32 + 1.0];
            dynamic.all_reduce_sum(&mut buf).expect("all_reduce");
            (dynamic.rank(), dynamic.world_size(), buf[0])
        });
        assert_eq!(results, vec![(0, 2, 3.0), (1, 2, 3.0)]);
    }

    #[test]
    fn create_rejects_zero_ranks_and_bad_slot_sizes() {
        assert!(matches!(
            ShmRegion::create(0, 64),
            Err(CommError::InvalidWorldSize { world_size: 0 })
        ));
        for slot_bytes in [0, 3, 6, usize::MAX - 2] {
            assert!(
                matches!(
                    ShmRegion::create(2, slot_bytes),
                    Err(CommError::InvalidSlotSize { slot_bytes: s }) if s == slot_bytes
                ),
                "{slot_bytes}"
            );
        }
        assert!(matches!(
            ShmRegion::create(usize::MAX / 4, 64),
            Err(CommError::InvalidWorldSize { .. })
        ));
    }

    #[test]
    fn attach_rejects_bad_ranks_world_sizes_and_double_attachment() {
        let region = ShmRegion::create(3, 64).expect("create region");
        assert!(matches!(
            ShmCommunicator::attach(region.fd(), 3, 3),
            Err(CommError::InvalidRank {
                rank: 3,
                world_size: 3
            })
        ));
        assert!(matches!(
            ShmCommunicator::attach(region.fd(), 0, 0),
            Err(CommError::InvalidWorldSize { world_size: 0 })
        ));
        assert!(matches!(
            ShmCommunicator::attach(region.fd(), 1, 4),
            Err(CommError::WorldSizeMismatch {
                expected: 4,
                found: 3
            })
        ));
        let first = ShmCommunicator::attach(region.fd(), 1, 3).expect("first attach");
        assert_eq!((first.rank(), first.world_size()), (1, 3));
        assert!(matches!(
            ShmCommunicator::attach(region.fd(), 1, 3),
            Err(CommError::RankInUse { rank: 1 })
        ));
    }

    #[test]
    fn attach_rejects_descriptors_that_are_not_a_region() {
        let empty = create_memfd().expect("memfd");
        assert!(matches!(
            ShmCommunicator::attach(empty.as_raw_fd(), 0, 1),
            Err(CommError::RegionTooSmall {
                size: 0,
                required: 128
            })
        ));
        let zeros = create_memfd().expect("memfd");
        size_and_seal(&zeros, 1 << 16).expect("size");
        assert!(matches!(
            ShmCommunicator::attach(zeros.as_raw_fd(), 0, 1),
            Err(CommError::NotARegion)
        ));
        assert!(matches!(
            ShmCommunicator::attach(-1, 0, 1),
            Err(CommError::Map(_))
        ));
    }

    #[test]
    fn attachment_outlives_the_descriptor_and_the_region_handle() {
        let region = ShmRegion::create(2, 64).expect("create region");
        // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor; no memory is involved.
        let dup = unsafe { libc::fcntl(region.fd(), libc::F_DUPFD_CLOEXEC, 0) };
        assert!(dup >= 0);
        // SAFETY: `dup` is a fresh descriptor owned by nobody else.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        let a = ShmCommunicator::attach(dup.as_raw_fd(), 0, 2).expect("attach 0");
        let b = ShmCommunicator::attach(region.fd(), 1, 2).expect("attach 1");
        drop(dup);
        drop(region);
        let results = thread::scope(|scope| {
            let handle = scope.spawn(move || {
                let mut buf = [2.0f32; 5];
                b.all_reduce_sum(&mut buf).map(|()| buf)
            });
            let mut buf = [1.0f32; 5];
            let mine = a.all_reduce_sum(&mut buf).map(|()| buf);
            (mine, handle.join().expect("rank 1 panicked"))
        });
        assert_eq!(results.0.expect("rank 0"), [3.0; 5]);
        assert_eq!(results.1.expect("rank 1"), [3.0; 5]);
    }

    #[test]
    fn region_descriptor_is_inheritable_and_the_file_size_is_sealed() {
        let region = ShmRegion::create(2, 64).expect("create region");
        // SAFETY: F_GETFD only reads descriptor flags.
        let flags = unsafe { libc::fcntl(region.fd(), libc::F_GETFD) };
        assert!(flags >= 0);
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
        // SAFETY: ftruncate on a sealed memfd must fail with EPERM; no memory is involved.
        let truncated = unsafe { libc::ftruncate(region.fd(), 0) };
        assert_eq!(truncated, -1);
        assert_eq!(
            file_size(region.fd()).expect("size"),
            region.size_bytes() as u64
        );
    }

    #[test]
    fn layout_places_every_block_on_its_own_cache_lines() {
        let layout = Layout::new(3, 100).expect("layout");
        assert_eq!(layout.slots_offset, 5 * LINE);
        assert_eq!(layout.slot_stride, LINE + 128);
        assert_eq!(layout.slot_offset(0, 0), 5 * LINE);
        assert_eq!(layout.slot_offset(1, 2), 5 * LINE + 5 * 256);
        assert_eq!(layout.result_offset, 5 * LINE + 6 * 256);
        assert_eq!(layout.total, layout.result_offset + 128);
        for rank in 0..5 {
            for world in rank + 1..9 {
                let share = reduce_share(1000, rank, world);
                assert_eq!(share.start % SHARE_UNIT, 0);
            }
        }
        let shares: Vec<_> = (0..3).map(|rank| reduce_share(65, rank, 3)).collect();
        assert_eq!(shares, vec![0..32, 32..64, 64..65]);
        let shares: Vec<_> = (0..3).map(|rank| reduce_share(33, rank, 3)).collect();
        assert_eq!(shares, vec![0..0, 0..32, 32..33]);
        assert_eq!(reduce_share(5, 0, 2), 0..0);
        assert_eq!(reduce_share(5, 1, 2), 0..5);
        assert_eq!(round_count(0, 7), 1);
        assert_eq!(round_count(15, 7), 3);
        assert_eq!(round_range(15, 2, 7), 14..15);
        assert_eq!(round_range(3, 2, 7), 3..3);
    }

    const CHILD_FD: &str = "PARALLELFORMERS_COMM_TEST_FD";
    const CHILD_RANK: &str = "PARALLELFORMERS_COMM_TEST_RANK";
    const CHILD_WORLD: &str = "PARALLELFORMERS_COMM_TEST_WORLD";

    /// What a rank of the child-process test observed: sum, gather, broadcast.
    type Observed = (Vec<f32>, Vec<f32>, Vec<u8>);

    /// The collectives each rank of the child-process test runs; returns what it observed.
    fn child_test_script(comm: &ShmCommunicator) -> Result<Observed, CommError> {
        let rank = comm.rank();
        let mut sum = integer_input(rank, 5000);
        comm.all_reduce_sum(&mut sum)?;
        let gathered = comm.all_gather(&vec![rank as f32; rank * 2])?;
        let mut bytes = vec![rank as u8; 100];
        comm.broadcast(&mut bytes, 1)?;
        comm.barrier()?;
        Ok((sum, gathered, bytes))
    }

    fn check_child_test_results(world: usize, observed: &Observed) {
        assert!(observed.0 == integer_sum(world, 5000));
        let gathered: Vec<f32> = (0..world).flat_map(|r| vec![r as f32; r * 2]).collect();
        assert_eq!(observed.1, gathered);
        assert_eq!(observed.2, vec![1u8; 100]);
    }

    /// Entry point of the child ranks of the next test; does nothing when run directly.
    #[test]
    #[ignore = "entry point for child-process ranks"]
    fn child_rank_entry_point() {
        let (Ok(fd), Ok(rank), Ok(world)) = (
            std::env::var(CHILD_FD),
            std::env::var(CHILD_RANK),
            std::env::var(CHILD_WORLD),
        ) else {
            return;
        };
        let parse = |value: String| value.parse::<usize>().expect("numeric variable");
        let fd = RawFd::try_from(parse(fd)).expect("descriptor number");
        let world = parse(world);
        let comm = ShmCommunicator::attach(fd, parse(rank), world).expect("attach in child");
        let _guard = AbortOnPanic(&comm);
        let observed = child_test_script(&comm).expect("collectives in child");
        check_child_test_results(world, &observed);
    }

    fn spawn_child_rank(region: &ShmRegion, rank: usize) -> Child {
        let module = module_path!();
        let test_path = module.split_once("::").map_or(module, |(_, rest)| rest);
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                &format!("{test_path}::child_rank_entry_point"),
                "--ignored",
                "--test-threads=1",
                "--quiet",
            ])
            .env(CHILD_FD, region.fd().to_string())
            .env(CHILD_RANK, rank.to_string())
            .env(CHILD_WORLD, region.world_size().to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn child rank")
    }

    #[test]
    fn ranks_in_child_processes_communicate_through_the_inherited_descriptor() {
        let world = 3;
        let region = ShmRegion::create(world, 4096).expect("create region");
        let children: Vec<Child> = (1..world)
            .map(|rank| spawn_child_rank(&region, rank))
            .collect();
        let comm = ShmCommunicator::attach(region.fd(), 0, world).expect("attach");
        let (observed, statuses) = thread::scope(|scope| {
            // The watchdog turns a failed child into an abort instead of a hang.
            let watchdog = scope.spawn(|| {
                children
                    .into_iter()
                    .map(|mut child| {
                        let status = child.wait().expect("wait for child");
                        if !status.success() {
                            region.abort();
                        }
                        status
                    })
                    .collect::<Vec<_>>()
            });
            let observed = child_test_script(&comm);
            (observed, watchdog.join().expect("watchdog panicked"))
        });
        assert!(
            statuses.iter().all(|status| status.success()),
            "{statuses:?}"
        );
        check_child_test_results(world, &observed.expect("collectives in parent"));
    }

    #[test]
    fn a_dead_child_rank_turns_into_aborted_once_the_launcher_aborts() {
        let region = ShmRegion::create(2, 4096).expect("create region");
        let mut child = Command::new("true")
            .spawn()
            .expect("spawn a child that dies at once");
        let comm = ShmCommunicator::attach(region.fd(), 0, 2).expect("attach");
        let result = thread::scope(|scope| {
            scope.spawn(|| {
                let status = child.wait().expect("wait for child");
                assert!(status.success());
                region.abort();
            });
            comm.all_reduce_sum(&mut [1.0; 8])
        });
        assert!(matches!(result, Err(CommError::Aborted)), "{result:?}");
    }

    /// Times batches of `iterations` calls of `op` on two thread ranks (each passing its own
    /// buffer of `len` floats), with a barrier before each batch; returns rank 0's (minimum,
    /// median) time per call over the batches.
    fn time_per_call(
        iterations: usize,
        len: usize,
        op: impl Fn(&ShmCommunicator, &mut [f32]) + Sync,
    ) -> (f64, f64) {
        let batches = 9;
        let results = with_ranks(2, DEFAULT_SLOT_BYTES, |comm| {
            let mut buf = vec![1.0f32; len];
            for _ in 0..iterations / 5 + 10 {
                op(comm, &mut buf);
            }
            (0..batches)
                .map(|_| {
                    comm.barrier().expect("barrier");
                    let start = Instant::now();
                    for _ in 0..iterations {
                        op(comm, &mut buf);
                    }
                    start.elapsed().as_secs_f64() * 1e6 / iterations as f64
                })
                .collect::<Vec<f64>>()
        });
        let mut micros = results.into_iter().next().unwrap_or_default();
        micros.sort_by(f64::total_cmp);
        (micros[0], micros[micros.len() / 2])
    }

    #[test]
    #[ignore = "micro-benchmark; run with --ignored --nocapture"]
    fn benchmark_all_reduce_with_two_thread_ranks() {
        let sizes = [768, 2048, 4096, 8192, 16384, 65536, 768 * 1024];
        for len in sizes {
            let iterations = (20_000_000 / (len + 1000)).clamp(20, 20_000);
            let (min, median) = time_per_call(iterations, len, |comm, buf| {
                comm.all_reduce_sum(buf).expect("all_reduce");
            });
            println!(
                "all_reduce_sum 2 ranks {len:>7} f32: min {min:9.2} us, median {median:9.2} us"
            );
        }
        let (min, median) = time_per_call(2000, 16_000, |comm, buf| {
            comm.all_gather(buf).expect("all_gather");
        });
        println!("all_gather 2 x 16000 f32: min {min:.2} us, median {median:.2} us");
        let (min, median) = time_per_call(20_000, 0, |comm, _| {
            comm.broadcast(&mut [0u8; 8], 0).expect("broadcast");
        });
        println!("broadcast 8 bytes: min {min:.2} us, median {median:.2} us");
        let (min, median) = time_per_call(20_000, 0, |comm, _| comm.barrier().expect("barrier"));
        println!("barrier: min {min:.2} us, median {median:.2} us");
    }
}
