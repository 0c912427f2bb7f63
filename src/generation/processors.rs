//! Logits processors and sampling warpers with the semantics of transformers' classes of the
//! same names, applied in transformers' order to one row of scores. Filtered tokens get
//! `-inf`, as transformers' `filter_value`.

use crate::generation::config::GenerationConfig;

/// A score no token can be chosen with.
const FILTERED: f32 = f32::NEG_INFINITY;

/// The processors a configuration asks for, in transformers' order: repetition penalty,
/// no-repeat n-grams, minimum new tokens; then, when sampling, temperature, top-k, top-p and
/// typical-p.
#[derive(Debug, Clone)]
pub struct LogitsPipeline {
    repetition_penalty: f32,
    no_repeat_ngram_size: usize,
    min_new_tokens: usize,
    eos: Vec<u32>,
    sampling: Option<Warpers>,
}

/// The warpers of a sampling configuration.
#[derive(Debug, Clone, Copy)]
struct Warpers {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    typical_p: f32,
}

/// What the processors read about one sequence.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    /// Every id of the row as the model sees it (padding included), for n-grams.
    pub ids: &'a [u32],
    /// Leading padding positions of `ids`, which the repetition penalty ignores.
    pub padding: usize,
    /// Tokens generated so far.
    pub new_tokens: usize,
}

impl LogitsPipeline {
    /// The pipeline of `config` with end-of-sequence ids `eos`.
    pub fn new(config: &GenerationConfig, eos: &[u32]) -> Self {
        LogitsPipeline {
            repetition_penalty: config.repetition_penalty,
            no_repeat_ngram_size: config.no_repeat_ngram_size,
            min_new_tokens: config.min_new_tokens,
            eos: eos.to_vec(),
            sampling: config.do_sample.then_some(Warpers {
                temperature: config.temperature,
                top_k: config.top_k,
                top_p: config.top_p,
                typical_p: config.typical_p,
            }),
        }
    }

    /// Applies every processor to `scores` (one row of logits) for a sequence with `history`.
    pub fn apply(&self, scores: &mut [f32], history: History) {
        if self.repetition_penalty != 1.0 {
            repetition_penalty(
                scores,
                &history.ids[history.padding..],
                self.repetition_penalty,
            );
        }
        if self.no_repeat_ngram_size > 0 {
            no_repeat_ngram(scores, history.ids, self.no_repeat_ngram_size);
        }
        if history.new_tokens < self.min_new_tokens {
            suppress(scores, &self.eos);
        }
        if let Some(w) = self.sampling {
            if w.temperature != 1.0 {
                temperature(scores, w.temperature);
            }
            if w.top_k != 0 {
                top_k(scores, w.top_k, 1);
            }
            if w.top_p < 1.0 {
                top_p(scores, w.top_p, 1);
            }
            if w.typical_p < 1.0 {
                typical_p(scores, w.typical_p, 1);
            }
        }
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: the score of every token that occurs in
/// `ids` is divided by `penalty` when positive and multiplied by it when negative (once per
/// token, however often it occurs).
pub fn repetition_penalty(scores: &mut [f32], ids: &[u32], penalty: f32) {
    let mut seen = vec![false; scores.len()];
    for &id in ids {
        let id = id as usize;
        if id < scores.len() && !seen[id] {
            seen[id] = true;
            let s = scores[id];
            scores[id] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// transformers' `NoRepeatNGramLogitsProcessor`: bans every token that would complete an
/// n-gram of size `n` already present in `ids`.
pub fn no_repeat_ngram(scores: &mut [f32], ids: &[u32], n: usize) {
    if ids.len() + 1 < n {
        return;
    }
    let prefix = &ids[ids.len() + 1 - n..];
    for window in ids.windows(n) {
        if &window[..n - 1] == prefix {
            if let Some(s) = scores.get_mut(window[n - 1] as usize) {
                *s = FILTERED;
            }
        }
    }
}

/// Sets the scores of `ids` to `-inf` (transformers' `MinNewTokensLengthLogitsProcessor`
/// suppresses end-of-sequence ids this way).
pub fn suppress(scores: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = FILTERED;
        }
    }
}

/// transformers' `TemperatureLogitsWarper`.
pub fn temperature(scores: &mut [f32], temperature: f32) {
    scores.iter_mut().for_each(|s| *s /= temperature);
}

/// transformers' `TopKLogitsWarper`: keeps the scores at least as large as the `k`-th largest
/// (`k` raised to `min_keep`; ties with it are kept).
pub fn top_k(scores: &mut [f32], k: usize, min_keep: usize) {
    let k = k.max(min_keep).min(scores.len());
    if k == 0 {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    scores
        .iter_mut()
        .filter(|s| **s < threshold)
        .for_each(|s| *s = FILTERED);
}

/// transformers' `TopPLogitsWarper`: with the tokens sorted by ascending score, removes those
/// whose cumulative probability is at most `1 - top_p`, keeping at least the `min_keep` most
/// likely.
pub fn top_p(scores: &mut [f32], top_p: f32, min_keep: usize) {
    // Most likely last; on ties the lower id counts as more likely (as argmax prefers it).
    // Filtered tokens would sort first and stay filtered: leave them out (after top-k, a few
    // dozen entries are sorted instead of the vocabulary).
    let mut order: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i] > FILTERED)
        .collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)));
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let mut cumulative = 0f32;
    let keep_from = order.len().saturating_sub(min_keep);
    let mut removed = Vec::new();
    for (rank, (&i, p)) in order.iter().zip(probs).enumerate() {
        cumulative += p;
        if cumulative <= 1.0 - top_p && rank < keep_from {
            removed.push(i);
        }
    }
    removed.into_iter().for_each(|i| scores[i] = FILTERED);
}

/// transformers' `TypicalLogitsWarper`: keeps the tokens whose surprise `-log p` is closest to
/// the distribution's entropy, in that order, until their probability mass reaches `mass`
/// (at least `min_keep` tokens).
pub fn typical_p(scores: &mut [f32], mass: f32, min_keep: usize) {
    // Filtered tokens have no probability, no share of the entropy, and would sort last: work
    // on the possible ones only.
    let live: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i] > FILTERED)
        .collect();
    if live.is_empty() {
        return;
    }
    let live_scores: Vec<f32> = live.iter().map(|&i| scores[i]).collect();
    let log_probs = log_softmax(&live_scores);
    let entropy: f32 = -log_probs.iter().map(|&l| l * l.exp()).sum::<f32>();
    let shifted: Vec<f32> = log_probs.iter().map(|&l| (-l - entropy).abs()).collect();
    // Most typical first; on ties the lower id first.
    let mut order: Vec<usize> = (0..live.len()).collect();
    order.sort_by(|&a, &b| shifted[a].total_cmp(&shifted[b]).then(a.cmp(&b)));
    let probs = softmax(&order.iter().map(|&i| live_scores[i]).collect::<Vec<_>>());
    let mut cumulative = 0f32;
    let below = probs
        .iter()
        .take_while(|&&p| {
            cumulative += p;
            cumulative < mass
        })
        .count();
    let cutoff = shifted[order[below.min(order.len() - 1)]];
    for (rank, &i) in order.iter().enumerate() {
        if rank >= min_keep && shifted[i] > cutoff {
            scores[live[i]] = FILTERED;
        }
    }
}

/// Softmax of `scores` in f32 (`-inf` gives 0).
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / total).collect()
}

/// Log-softmax of `scores` in f32 (`-inf` stays `-inf`).
fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = scores.iter().map(|&s| (s - max).exp()).sum::<f32>().ln();
    scores.iter().map(|&s| s - max - log_total).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' outputs on fixed logits (tests/fixtures/generation/processors.json,
    /// written by scripts/make_generation_fixtures.py).
    struct Recorded {
        logits: Vec<Vec<f32>>,
        input_ids: Vec<Vec<u32>>,
        outputs: serde_json::Map<String, serde_json::Value>,
    }

    fn recorded() -> Recorded {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/generation/processors.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        Recorded {
            logits: serde_json::from_value(v["logits"].clone()).unwrap(),
            input_ids: serde_json::from_value(v["input_ids"].clone()).unwrap(),
            outputs: v["outputs"].as_object().unwrap().clone(),
        }
    }

    /// Applies `f` to every recorded row and compares with transformers' output `name`.
    fn check(name: &str, f: impl Fn(&mut [f32], &[u32])) {
        let r = recorded();
        let want = r.outputs[name].as_array().unwrap();
        for (row, (logits, ids)) in r.logits.iter().zip(&r.input_ids).enumerate() {
            let mut got = logits.clone();
            f(&mut got, ids);
            let want_row = want[row].as_array().unwrap();
            for (i, (g, w)) in got.iter().zip(want_row).enumerate() {
                match w.as_f64() {
                    None => assert_eq!(
                        *g,
                        f32::NEG_INFINITY,
                        "{name} row {row} token {i}: got {g}, want -inf"
                    ),
                    Some(w) => assert!(
                        (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{name} row {row} token {i}: got {g}, want {w}"
                    ),
                }
            }
        }
    }

    #[test]
    fn processors_match_transformers_on_recorded_logits() {
        check("repetition_penalty_1.3", |s, ids| {
            repetition_penalty(s, ids, 1.3)
        });
        check("repetition_penalty_0.8", |s, ids| {
            repetition_penalty(s, ids, 0.8)
        });
        check("no_repeat_ngram_2", |s, ids| no_repeat_ngram(s, ids, 2));
        check("no_repeat_ngram_3", |s, ids| no_repeat_ngram(s, ids, 3));
        check("min_new_tokens_eos_3_7", |s, _| suppress(s, &[3, 7]));
        check("temperature_0.7", |s, _| temperature(s, 0.7));
        check("temperature_1.8", |s, _| temperature(s, 1.8));
        check("top_k_5", |s, _| top_k(s, 5, 1));
        check("top_k_1", |s, _| top_k(s, 1, 1));
        check("top_p_0.8", |s, _| top_p(s, 0.8, 1));
        check("top_p_0.3", |s, _| top_p(s, 0.3, 1));
        check("typical_p_0.9", |s, _| typical_p(s, 0.9, 1));
        check("typical_p_0.4", |s, _| typical_p(s, 0.4, 1));
    }

    #[test]
    fn the_sampling_pipeline_matches_transformers_order() {
        let config = GenerationConfig {
            do_sample: true,
            repetition_penalty: 1.2,
            no_repeat_ngram_size: 2,
            temperature: 0.8,
            top_k: 12,
            top_p: 0.9,
            typical_p: 0.95,
            ..GenerationConfig::default()
        };
        let pipeline = LogitsPipeline::new(&config, &[]);
        check("pipeline", |s, ids| {
            pipeline.apply(
                s,
                History {
                    ids,
                    padding: 0,
                    new_tokens: 0,
                },
            )
        });
    }

    #[test]
    fn min_new_tokens_suppresses_eos_only_until_reached() {
        let config = GenerationConfig {
            min_new_tokens: 2,
            ..GenerationConfig::default()
        };
        let pipeline = LogitsPipeline::new(&config, &[1]);
        let mut early = vec![0.0, 5.0, 1.0];
        pipeline.apply(
            &mut early,
            History {
                ids: &[2],
                padding: 0,
                new_tokens: 1,
            },
        );
        assert_eq!(early[1], f32::NEG_INFINITY);
        let mut late = vec![0.0, 5.0, 1.0];
        pipeline.apply(
            &mut late,
            History {
                ids: &[2],
                padding: 0,
                new_tokens: 2,
            },
        );
        assert_eq!(late[1], 5.0);
    }

    #[test]
    fn the_repetition_penalty_ignores_left_padding() {
        let config = GenerationConfig {
            repetition_penalty: 2.0,
            ..GenerationConfig::default()
        };
        let pipeline = LogitsPipeline::new(&config, &[]);
        let mut scores = vec![4.0, 4.0, 4.0];
        pipeline.apply(
            &mut scores,
            History {
                ids: &[0, 0, 2],
                padding: 2,
                new_tokens: 0,
            },
        );
        assert_eq!(scores, [4.0, 4.0, 2.0]);
    }
}
