//! The server's counters, rendered in Prometheus' text format at `GET /metrics`. Memory is
//! read from `/proc` when the metrics are rendered, for the server process and each rank
//! process, so a scrape shows what the processes hold now rather than at load.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::generation::prefix_cache::PrefixCacheReport;
use crate::parallel::memory::RankMemory;

/// Counters shared by the handlers and the model thread.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Requests waiting for the model or being generated.
    pub in_flight: AtomicUsize,
    first_token_micros: AtomicU64,
    first_tokens: AtomicU64,
    decode_micros: AtomicU64,
    decoded_tokens: AtomicU64,
    ranks: Mutex<Vec<RankMemory>>,
    restarts: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    prefix_miss_tokens: AtomicU64,
    prefix_bytes: AtomicU64,
    /// The rank processes' ids, in rank order (empty where ranks are not local processes).
    rank_pids: Mutex<Vec<u32>>,
}

impl Metrics {
    /// Counts a finished request of `route` answered with `status`.
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route, status)).or_default() += 1;
        }
    }

    /// Counts a request's prompt tokens.
    pub fn prompt_tokens(&self, tokens: usize) {
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// Records the wait from a request's arrival to its first token.
    pub fn first_token(&self, after: Duration) {
        self.first_token_micros
            .fetch_add(after.as_micros() as u64, Ordering::Relaxed);
        self.first_tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts tokens generated.
    pub fn completion_tokens(&self, tokens: usize) {
        self.completion_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// Records `tokens` output tokens after a sequence's first that took `decode` in all.
    pub fn decode_time(&self, tokens: usize, decode: Duration) {
        self.decode_micros
            .fetch_add(decode.as_micros() as u64, Ordering::Relaxed);
        self.decoded_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// Replaces the ranks: their memory figures after loading, and their process ids in rank
    /// order, whose memory each scrape reads (empty where ranks are not local processes).
    pub fn set_ranks(&self, ranks: Vec<RankMemory>, pids: Vec<u32>) {
        if let Ok(mut held) = self.ranks.lock() {
            *held = ranks;
        }
        if let Ok(mut held) = self.rank_pids.lock() {
            *held = pids;
        }
    }

    /// Counts a restart of the ranks, whose memory after loading is `ranks` and whose process
    /// ids are `pids` (their prefix caches start empty).
    pub fn restarted(&self, ranks: Vec<RankMemory>, pids: Vec<u32>) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.prefix_bytes.store(0, Ordering::Relaxed);
        self.set_ranks(ranks, pids);
    }

    /// Adds the prefix cache's hits and misses since its last report, and takes what it holds.
    pub fn prefix_cache(&self, report: &PrefixCacheReport) {
        self.prefix_hit_tokens
            .fetch_add(report.hit_tokens, Ordering::Relaxed);
        self.prefix_miss_tokens
            .fetch_add(report.miss_tokens, Ordering::Relaxed);
        self.prefix_bytes.store(report.bytes, Ordering::Relaxed);
    }

    /// How many times the ranks were restarted after a failure.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Everything in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let seconds = |micros: &AtomicU64| load(micros) as f64 / 1e6;
        header(
            &mut text,
            "parallelformers_requests_total",
            "counter",
            "Requests answered, by route and status.",
        );
        if let Ok(requests) = self.requests.lock() {
            for ((route, status), count) in requests.iter() {
                let _ = writeln!(
                    text,
                    "parallelformers_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        let scalars: [(&str, &str, &str, String); 11] = [
            (
                "parallelformers_prompt_tokens_total",
                "counter",
                "Prompt tokens received.",
                load(&self.prompt_tokens).to_string(),
            ),
            (
                "parallelformers_completion_tokens_total",
                "counter",
                "Tokens generated.",
                load(&self.completion_tokens).to_string(),
            ),
            (
                "parallelformers_queue_depth",
                "gauge",
                "Requests waiting for the model or being generated.",
                self.in_flight.load(Ordering::Relaxed).to_string(),
            ),
            (
                "parallelformers_time_to_first_token_seconds_sum",
                "counter",
                "Summed wait from arrival to first token.",
                seconds(&self.first_token_micros).to_string(),
            ),
            (
                "parallelformers_time_to_first_token_seconds_count",
                "counter",
                "Requests that received a first token.",
                load(&self.first_tokens).to_string(),
            ),
            (
                "parallelformers_time_per_output_token_seconds_sum",
                "counter",
                "Summed wait between consecutive tokens of a sequence.",
                seconds(&self.decode_micros).to_string(),
            ),
            (
                "parallelformers_time_per_output_token_seconds_count",
                "counter",
                "Tokens after the first of each sequence.",
                load(&self.decoded_tokens).to_string(),
            ),
            (
                "parallelformers_rank_restarts_total",
                "counter",
                "Restarts of the ranks after a rank failed.",
                self.restarts().to_string(),
            ),
            (
                "parallelformers_prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens whose keys and values came from the prefix cache.",
                load(&self.prefix_hit_tokens).to_string(),
            ),
            (
                "parallelformers_prefix_cache_miss_tokens_total",
                "counter",
                "Prompt tokens computed because the prefix cache did not hold them.",
                load(&self.prefix_miss_tokens).to_string(),
            ),
            (
                "parallelformers_prefix_cache_bytes",
                "gauge",
                "Bytes of keys and values the prefix cache holds on the busiest rank.",
                load(&self.prefix_bytes).to_string(),
            ),
        ];
        for (name, kind, help, value) in scalars {
            header(&mut text, name, kind, help);
            let _ = writeln!(text, "{name} {value}");
        }
        if let Some((resident, _)) = process_memory("self") {
            header(
                &mut text,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the server process.",
            );
            let _ = writeln!(text, "process_resident_memory_bytes {resident}");
        }
        header(
            &mut text,
            "parallelformers_rank_memory_bytes",
            "gauge",
            "Memory of each rank: resident and peak as the rank process holds them now (as at \
             load where ranks are not local processes; left out for a rank process that is \
             gone), and the key/value cache reserved at load.",
        );
        let pids = self.rank_pids.lock().map(|p| p.clone()).unwrap_or_default();
        if let Ok(ranks) = self.ranks.lock() {
            for m in ranks.iter() {
                let now = match pids.len() == ranks.len() {
                    true => pids
                        .get(m.rank)
                        .and_then(|pid| process_memory(&pid.to_string())),
                    false => Some((m.resident_bytes, m.peak_bytes)),
                };
                let mut kinds = vec![("kv_cache", m.kv_cache_bytes)];
                if let Some((resident, peak)) = now {
                    kinds.splice(0..0, [("resident", resident), ("peak", peak)]);
                }
                for (kind, bytes) in kinds {
                    let _ = writeln!(
                        text,
                        "parallelformers_rank_memory_bytes{{rank=\"{}\",kind=\"{kind}\"}} {bytes}",
                        m.rank
                    );
                }
            }
        }
        text
    }
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn header(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `(VmRSS, VmHWM)` in bytes of process `pid` (a number, or `self`) from `/proc/PID/status`;
/// `None` when it cannot be read (the process is gone).
fn process_memory(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        status_bytes(&status, "VmRSS:")?,
        status_bytes(&status, "VmHWM:")?,
    ))
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn status_bytes(status: &str, key: &str) -> Option<u64> {
    let kb = status.lines().find_map(|l| l.strip_prefix(key))?;
    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::engine::WeightBytes;

    fn line_value(text: &str, prefix: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status = "Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(status_bytes(status, "VmRSS:"), Some(1024 * 1024));
        assert_eq!(status_bytes(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(status_bytes(status, "VmSwap:"), None);
    }

    #[test]
    fn rank_memory_is_read_when_scraped_not_kept_from_load() {
        let metrics = Metrics::default();
        let at_load = RankMemory {
            rank: 0,
            weights: WeightBytes::default(),
            kv_cache_bytes: 7,
            resident_bytes: 1,
            peak_bytes: 1,
            experts: None,
        };
        metrics.set_ranks(vec![at_load], Vec::new());
        let text = metrics.render();
        assert_eq!(
            line_value(
                &text,
                "parallelformers_rank_memory_bytes{rank=\"0\",kind=\"resident\"}"
            ),
            Some(1),
            "without pids, the load-time figure"
        );
        // This process stands in for the rank.
        metrics.set_ranks(vec![at_load], vec![std::process::id()]);
        let text = metrics.render();
        let resident = line_value(
            &text,
            "parallelformers_rank_memory_bytes{rank=\"0\",kind=\"resident\"}",
        )
        .unwrap();
        assert!(resident > 1 << 20, "{text}");
        assert_eq!(
            line_value(
                &text,
                "parallelformers_rank_memory_bytes{rank=\"0\",kind=\"kv_cache\"}"
            ),
            Some(7)
        );
        assert!(line_value(&text, "process_resident_memory_bytes").unwrap() > 1 << 20);
        // A rank process that is gone has no resident figure.
        metrics.set_ranks(vec![at_load], vec![u32::MAX]);
        let text = metrics.render();
        assert!(!text.contains("kind=\"resident\""), "{text}");
    }
}
