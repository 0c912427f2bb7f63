//! The machine's memory read bandwidth, measured: the ceiling for batch-1 decode, which streams
//! every weight once per token.

use std::sync::Barrier;
use std::time::Instant;

/// Bytes each thread streams per pass: well beyond the caches (with every thread's buffer
/// together beyond a last-level cache of a few hundred MB).
const BUFFER_BYTES: usize = 256 << 20;

/// Passes over the buffers; the fastest is reported.
const PASSES: usize = 4;

/// Reads `threads` private buffers at once, thread `i` pinned to CPU `i`, and returns the
/// total bytes per second of the fastest pass.
pub fn measure_read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let barrier = Barrier::new(threads);
    let seconds: Vec<f64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|cpu| {
                let barrier = &barrier;
                scope.spawn(move || {
                    crate::parallel::process::pin_to(&[cpu]);
                    // Distinct non-zero words, so every page is really committed and read.
                    let buffer: Vec<u64> = (0..BUFFER_BYTES / 8).map(|i| i as u64 | 1).collect();
                    (0..PASSES)
                        .map(|_| {
                            barrier.wait();
                            let start = Instant::now();
                            std::hint::black_box(stream_sum(&buffer));
                            let elapsed = start.elapsed().as_secs_f64();
                            barrier.wait();
                            elapsed
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        let per_thread: Vec<Vec<f64>> = workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| vec![f64::INFINITY; PASSES]))
            .collect();
        // A pass lasts as long as its slowest thread.
        (0..PASSES)
            .map(|p| per_thread.iter().map(|t| t[p]).fold(0.0, f64::max))
            .collect()
    });
    let fastest = seconds.into_iter().fold(f64::INFINITY, f64::min);
    (threads * BUFFER_BYTES) as f64 / fastest
}

/// Words summed per step of one stream: one cache line.
const LINE_WORDS: usize = 8;

/// Independent streams read side by side, as the decode kernel reads several weight rows.
const STREAMS: usize = 8;

/// A wrapping sum of every word, read as [`STREAMS`] interleaved sequential streams with the
/// next lines prefetched: the access pattern that gets the most out of one core's memory
/// bandwidth here (a plain sequential sum reaches about two thirds of it).
fn stream_sum(words: &[u64]) -> u64 {
    let len = words.len() / STREAMS / LINE_WORDS * LINE_WORDS;
    let mut sums = [[0u64; LINE_WORDS]; STREAMS];
    let mut k = 0;
    while k < len {
        for (s, sum) in sums.iter_mut().enumerate() {
            let start = s * len + k;
            prefetch(words.as_ptr().wrapping_add(start + 8 * LINE_WORDS));
            for (acc, &w) in sum.iter_mut().zip(&words[start..start + LINE_WORDS]) {
                *acc = acc.wrapping_add(w);
            }
        }
        k += LINE_WORDS;
    }
    let tail = words[STREAMS * len..]
        .iter()
        .fold(0u64, |sum, &w| sum.wrapping_add(w));
    sums.iter()
        .flatten()
        .fold(tail, |sum, &w| sum.wrapping_add(w))
}

/// Asks the CPU to start loading the cache line at `ptr` (a hint: the address is never read
/// through, so it may lie past the buffer).
#[inline(always)]
fn prefetch(ptr: *const u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(ptr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_sum_adds_every_word() {
        assert_eq!(stream_sum(&[1, 2, 3, u64::MAX]), 5);
        let words: Vec<u64> = (0..1000).collect();
        assert_eq!(stream_sum(&words), 999 * 1000 / 2);
    }
}
