//! All-reduce latency and bandwidth of a communicator, for `parallelformers comm-bench`: the
//! shared-memory backend and the MPI backend side by side.

use std::time::Instant;

use super::{CommError, Communicator, ShmCommunicator, ShmRegion, DEFAULT_SLOT_BYTES};

/// Bytes all-reduced per size and iteration, summed over iterations, that a size aims at: small
/// messages repeat often enough for a stable median, large ones a few times.
const BYTES_PER_SIZE: usize = 256 << 20;
/// Bounds on the iterations of one size.
const ITERATIONS: (usize, usize) = (5, 2000);
/// The largest message measured.
pub const LARGEST_MESSAGE_BYTES: usize = 16 << 20;

/// The timing of one message size.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AllReduceTiming {
    /// Message size in bytes (f32 values × 4).
    pub bytes: usize,
    /// All-reduces timed.
    pub iterations: usize,
    /// The median time of one all-reduce on rank 0, in seconds.
    pub median_seconds: f64,
    /// `bytes / median_seconds`: bytes reduced per second.
    pub bytes_per_second: f64,
}

/// The sizes measured: one hidden vector of `hidden` f32 values, then 16 KiB, and every
/// fourfold size up to [`LARGEST_MESSAGE_BYTES`].
pub fn message_sizes(hidden: usize) -> Vec<usize> {
    std::iter::once(hidden * 4)
        .chain(std::iter::successors(Some(16 << 10), |&b| {
            (b < LARGEST_MESSAGE_BYTES).then_some(b * 4)
        }))
        .collect()
}

/// Times `all_reduce_sum` of each size in `sizes` (bytes). A collective: every rank of `comm`
/// calls it with the same sizes; each returns its own medians (rank 0's are the ones reported).
pub fn time_all_reduce(
    comm: &dyn Communicator,
    sizes: &[usize],
) -> Result<Vec<AllReduceTiming>, CommError> {
    sizes
        .iter()
        .map(|&bytes| {
            let mut buffer = vec![1.0f32; bytes / 4];
            let iterations = (BYTES_PER_SIZE / bytes.max(1)).clamp(ITERATIONS.0, ITERATIONS.1);
            // One untimed round, so that every rank has arrived and buffers are warm.
            comm.all_reduce_sum(&mut buffer)?;
            comm.barrier()?;
            let mut seconds = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                buffer.fill(1.0);
                let start = Instant::now();
                comm.all_reduce_sum(&mut buffer)?;
                seconds.push(start.elapsed().as_secs_f64());
            }
            seconds.sort_by(f64::total_cmp);
            let median = seconds[seconds.len() / 2];
            Ok(AllReduceTiming {
                bytes,
                iterations,
                median_seconds: median,
                bytes_per_second: bytes as f64 / median,
            })
        })
        .collect()
}

/// [`time_all_reduce`] over `ranks` threads of this process that share a shared-memory region
/// as worker processes do; rank 0's timings.
pub fn time_shm_all_reduce(
    ranks: usize,
    sizes: &[usize],
) -> Result<Vec<AllReduceTiming>, CommError> {
    let region = ShmRegion::create(ranks, DEFAULT_SLOT_BYTES)?;
    let fd = region.fd();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..ranks)
            .map(|rank| {
                scope.spawn(move || {
                    let comm = ShmCommunicator::attach(fd, rank, ranks)?;
                    time_all_reduce(&comm, sizes)
                })
            })
            .collect();
        // Every thread is joined (by the scope); rank 0's timings are the answer.
        threads
            .into_iter()
            .next()
            .map_or(Err(CommError::Aborted), |rank0| {
                rank0.join().unwrap_or(Err(CommError::Aborted))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_run_from_a_hidden_vector_to_16_mib() {
        let sizes = message_sizes(576);
        assert_eq!(sizes.first(), Some(&2304));
        assert_eq!(sizes[1], 16 << 10);
        assert_eq!(sizes.last(), Some(&LARGEST_MESSAGE_BYTES));
    }

    #[test]
    fn shared_memory_all_reduce_is_timed_at_every_size() {
        let timings = time_shm_all_reduce(2, &[64, 4096]).unwrap();
        assert_eq!(timings.len(), 2);
        assert!(timings
            .iter()
            .all(|t| t.median_seconds > 0.0 && t.iterations >= 5));
    }
}
