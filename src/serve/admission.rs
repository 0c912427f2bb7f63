//! Admission by memory: how much of a rank's memory the running batch may take, and whether
//! a request fits in it — ever (else 400, naming the limit), or now (else it waits in the
//! queue until running sequences leave).
//!
//! A batch's memory on a rank is counted per row: its key/value cache, reserved up to the
//! width of the batch's longest row (every row of a batch is as wide as the longest, and a
//! cache may reserve up to twice what it holds, see [`reserved_positions`]), plus its logits.
//! A row's width is bounded by its prompt plus `max_tokens`, so the count made at admission
//! bounds the batch for as long as the row runs.

use crate::checkpoint::ModelConfig;
use crate::error::{Error, Result};
use crate::models::attention::reserved_positions;
use crate::parallel::Plan;
use crate::serve::openai::ApiError;

/// Copies of a row's logits a rank holds while choosing its next token.
const LOGITS_COPIES: u64 = 3;

/// The limits of the running batch, and what each row costs a rank.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLimits {
    /// Most sequences decoded together (and so most choices, `n`, of one request).
    pub max_rows: usize,
    /// Memory the batch may take on each rank, in bytes.
    pub memory_bytes: u64,
    /// Bytes of key/value cache one position of one row costs the busiest rank.
    bytes_per_position: u64,
    /// Bytes one row costs besides its cache (its logits).
    bytes_per_row: u64,
}

impl BatchLimits {
    /// The limits for `config` split over `ranks`: at most `max_rows` rows, and `memory_bytes`
    /// per rank (`None`: [`default_memory`]).
    pub fn new(
        config: &ModelConfig,
        ranks: usize,
        max_rows: usize,
        memory_bytes: Option<u64>,
    ) -> Result<Self> {
        if max_rows == 0 {
            return Err(Error::InvalidInput(
                "the batch must allow at least one sequence (--max-batch)".into(),
            ));
        }
        let plan = Plan::new(config, ranks)?;
        let f32_bytes = std::mem::size_of::<f32>() as u64;
        Ok(BatchLimits {
            max_rows,
            memory_bytes: memory_bytes.unwrap_or_else(|| default_memory(ranks)),
            bytes_per_position: plan.kv_bytes_per_position(config),
            bytes_per_row: config.vocab_size as u64 * f32_bytes * LOGITS_COPIES,
        })
    }

    /// Bytes a batch of `rows` rows, the longest `positions` wide, costs a rank.
    pub fn footprint(&self, rows: usize, positions: usize) -> u64 {
        let row =
            reserved_positions(positions) as u64 * self.bytes_per_position + self.bytes_per_row;
        (rows as u64).saturating_mul(row)
    }

    /// Refuses a request of `n` choices of `prompt + max_tokens` positions that could never
    /// run, even alone: 400 naming the limit.
    pub fn check_request(&self, n: usize, positions: usize) -> std::result::Result<(), ApiError> {
        if n > self.max_rows {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "n = {n} exceeds the server's limit of {} sequences per request (--max-batch)",
                    self.max_rows
                ),
            ));
        }
        let needed = self.footprint(n, positions);
        if needed > self.memory_bytes {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "n × (prompt + max_tokens) = {n} × {positions} positions needs {} MiB per rank, more than the server's batch memory of {} MiB (--batch-memory-mib); ask for fewer choices or tokens",
                    needed.div_ceil(1 << 20),
                    self.memory_bytes >> 20
                ),
            ));
        }
        Ok(())
    }

    /// Refuses an embedding request of more inputs than the batch has rows: 400 naming the
    /// limit (the inputs run as one batch).
    pub fn check_inputs(&self, inputs: usize) -> std::result::Result<(), ApiError> {
        match inputs > self.max_rows {
            true => Err(ApiError::invalid(
                "input",
                format!(
                    "{inputs} inputs exceed the server's limit of {} per request (--max-batch)",
                    self.max_rows
                ),
            )),
            false => Ok(()),
        }
    }

    /// Whether `n` rows of up to `positions` positions fit now beside a running batch of
    /// `rows` rows whose longest is `longest` positions wide.
    pub fn fits(&self, rows: usize, longest: usize, n: usize, positions: usize) -> bool {
        let rows = rows + n;
        rows <= self.max_rows && self.footprint(rows, longest.max(positions)) <= self.memory_bytes
    }
}

/// The default batch memory of a rank: a quarter of the memory available now, shared by the
/// ranks (the rest is headroom for prefill activations and the copies a join makes).
pub fn default_memory(ranks: usize) -> u64 {
    available_memory().unwrap_or(4 << 30) / 4 / ranks.max(1) as u64
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::config::RawConfig;

    fn limits(max_rows: usize, memory_bytes: u64) -> BatchLimits {
        let config = RawConfig::from_value(serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 4096,
        }))
        .and_then(RawConfig::resolve)
        .unwrap();
        BatchLimits::new(&config, 2, max_rows, Some(memory_bytes)).unwrap()
    }

    #[test]
    fn a_row_costs_its_reserved_cache_and_its_logits() {
        let limits = limits(8, 1 << 30);
        // 2 layers × 1 kv head on each of 2 ranks × head_dim 16 × keys and values × 4 bytes.
        assert_eq!(limits.bytes_per_position, 2 * 2 * 16 * 4);
        assert_eq!(limits.bytes_per_row, 1000 * 4 * 3);
        // Short rows reserve the first capacity; long ones up to twice their width.
        assert_eq!(limits.footprint(1, 10), 256 * 256 + 12_000);
        assert_eq!(limits.footprint(3, 1000), 3 * (2000 * 256 + 12_000));
    }

    #[test]
    fn requests_that_never_fit_are_refused_naming_the_limit_and_others_wait_their_turn() {
        let limits = limits(8, 4 << 20);
        let too_many = limits.check_request(9, 10).unwrap_err();
        assert!(
            too_many.message().contains("--max-batch"),
            "{}",
            too_many.message()
        );
        let too_long = limits.check_request(8, 4000).unwrap_err();
        assert!(
            too_long.message().contains("--batch-memory-mib"),
            "{}",
            too_long.message()
        );
        assert!(limits.check_request(4, 1500).is_ok());
        // Alone it fits; beside a running batch of the same shape it must wait.
        assert!(limits.fits(0, 0, 4, 1500));
        assert!(!limits.fits(4, 1500, 4, 1500));
        assert!(!limits.fits(6, 10, 4, 10), "more rows than --max-batch");
        assert!(limits.check_inputs(8).is_ok());
        assert!(limits
            .check_inputs(9)
            .unwrap_err()
            .message()
            .contains("--max-batch"));
    }
}
