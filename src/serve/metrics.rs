//! The server's counters, rendered in Prometheus' text format at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

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

    /// Replaces the per-rank memory figures.
    pub fn set_ranks(&self, ranks: Vec<RankMemory>) {
        if let Ok(mut held) = self.ranks.lock() {
            *held = ranks;
        }
    }

    /// Counts a restart of the ranks, whose memory after loading is `ranks`.
    pub fn restarted(&self, ranks: Vec<RankMemory>) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.set_ranks(ranks);
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
        let scalars: [(&str, &str, &str, String); 8] = [
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
        ];
        for (name, kind, help, value) in scalars {
            header(&mut text, name, kind, help);
            let _ = writeln!(text, "{name} {value}");
        }
        header(
            &mut text,
            "parallelformers_rank_memory_bytes",
            "gauge",
            "Memory of each rank.",
        );
        if let Ok(ranks) = self.ranks.lock() {
            for m in ranks.iter() {
                for (kind, bytes) in [
                    ("resident", m.resident_bytes),
                    ("peak", m.peak_bytes),
                    ("kv_cache", m.kv_cache_bytes),
                ] {
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
