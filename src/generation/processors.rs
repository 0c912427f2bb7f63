//! Logits processors and sampling warpers with the semantics of transformers' classes of the
//! same names, applied in transformers' order to one row of scores. Filtered tokens get
//! `-inf`, as transformers' `filter_value`.

use crate::generation::config::GenerationConfig;

/// A score no token can be chosen with.
const FILTERED: f32 = f32::NEG_INFINITY;

/// The processors a configuration asks for, in transformers' order: sequence biases, the
/// encoder repetition penalty, repetition penalty, no-repeat n-grams, encoder no-repeat
/// n-grams, bad words, minimum new tokens, forced BOS and EOS
/// tokens, the exponential decay length penalty, suppressed tokens, tokens suppressed at the
/// first step; then, when sampling, temperature, top-k, top-p, min-p, typical-p, epsilon and
/// eta cutoffs; last, renormalisation.
#[derive(Debug, Clone)]
pub struct LogitsPipeline {
    sequence_bias: Vec<(Vec<u32>, f32)>,
    encoder_repetition_penalty: f32,
    repetition_penalty: f32,
    no_repeat_ngram_size: usize,
    encoder_no_repeat_ngram_size: usize,
    bad_words: Vec<(Vec<u32>, f32)>,
    min_new_tokens: usize,
    eos: Vec<u32>,
    forced_bos: Option<u32>,
    forced_eos: Option<Vec<u32>>,
    max_new_tokens: usize,
    length_decay: Option<(usize, f32)>,
    suppress_tokens: Vec<u32>,
    begin_suppress_tokens: Vec<u32>,
    sampling: Option<Warpers>,
    renormalize: bool,
}

/// The warpers of a sampling configuration.
#[derive(Debug, Clone, Copy)]
struct Warpers {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: Option<f32>,
    typical_p: f32,
    epsilon_cutoff: f32,
    eta_cutoff: f32,
}

/// What the processors read about one sequence.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    /// Every id of the row as the model sees it (padding included), for n-grams.
    pub ids: &'a [u32],
    /// What transformers' encoder processors read: a decoder-only model's prompt as padded
    /// (the start of `ids`), an encoder–decoder's encoder prompt (padded on the right, as
    /// their tokenizers pad).
    pub prompt: &'a [u32],
    /// Leading padding positions of `ids`, which the repetition penalty ignores.
    pub padding: usize,
    /// Tokens generated so far.
    pub new_tokens: usize,
}

impl LogitsPipeline {
    /// The pipeline of `config` with end-of-sequence ids `eos`.
    pub fn new(config: &GenerationConfig, eos: &[u32]) -> Self {
        // transformers' `NoBadWordsLogitsProcessor`: a ban of a lone end-of-sequence id is
        // dropped; the others are biases of -inf.
        let bad_words = config
            .bad_words_ids
            .iter()
            .filter(|words| !(words.len() == 1 && eos.contains(&words[0])))
            .map(|words| (words.clone(), FILTERED))
            .collect();
        LogitsPipeline {
            sequence_bias: config.sequence_bias.clone(),
            encoder_repetition_penalty: config.encoder_repetition_penalty,
            repetition_penalty: config.repetition_penalty,
            no_repeat_ngram_size: config.no_repeat_ngram_size,
            encoder_no_repeat_ngram_size: config.encoder_no_repeat_ngram_size,
            bad_words,
            min_new_tokens: config.min_new_tokens,
            eos: eos.to_vec(),
            forced_bos: config.forced_bos_token_id,
            forced_eos: config.forced_eos_token_id.clone(),
            max_new_tokens: config.max_new_tokens,
            length_decay: config.exponential_decay_length_penalty,
            suppress_tokens: config.suppress_tokens.clone(),
            begin_suppress_tokens: config.begin_suppress_tokens.clone(),
            sampling: config.do_sample.then_some(Warpers {
                temperature: config.temperature,
                top_k: config.top_k,
                top_p: config.top_p,
                min_p: config.min_p,
                typical_p: config.typical_p,
                epsilon_cutoff: config.epsilon_cutoff,
                eta_cutoff: config.eta_cutoff,
            }),
            renormalize: config.renormalize_logits,
        }
    }

    /// Applies every processor to `scores` (one row of logits) for a sequence with `history`.
    pub fn apply(&self, scores: &mut [f32], history: History) {
        sequence_bias(scores, history.ids, &self.sequence_bias);
        if self.encoder_repetition_penalty != 1.0 {
            encoder_repetition_penalty(scores, history.prompt, self.encoder_repetition_penalty);
        }
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
        if self.encoder_no_repeat_ngram_size > 0 {
            ban_ngrams_of(
                scores,
                history.prompt,
                history.ids,
                self.encoder_no_repeat_ngram_size,
            );
        }
        sequence_bias(scores, history.ids, &self.bad_words);
        if history.new_tokens < self.min_new_tokens {
            suppress(scores, &self.eos);
        }
        // transformers counts the sequence's length (`input_ids.shape[-1]`): its prompt as
        // padded, or an encoder–decoder's start token, and the new tokens.
        let start_len = history.ids.len().saturating_sub(history.new_tokens);
        if let Some(bos) = self.forced_bos {
            if history.ids.len() == 1 {
                force(scores, &[bos]);
            }
        }
        if let Some(eos) = &self.forced_eos {
            // transformers' `max_length - 1`: the step that chooses the last token.
            if history.new_tokens + 1 == self.max_new_tokens {
                force(scores, eos);
            }
        }
        if let Some((start, factor)) = self.length_decay {
            // transformers counts from the prompt's end (`start` + the input's length).
            if history.new_tokens > start {
                length_decay(scores, &self.eos, factor, history.new_tokens - start);
            }
        }
        suppress(scores, &self.suppress_tokens);
        // The first step, or the second when it follows a forced BOS of a one-token start.
        let begin = usize::from(start_len == 1 && self.forced_bos.is_some());
        if history.new_tokens == begin {
            suppress(scores, &self.begin_suppress_tokens);
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
            if let Some(p) = w.min_p {
                min_p(scores, p, 1);
            }
            if w.typical_p < 1.0 {
                typical_p(scores, w.typical_p, 1);
            }
            if w.epsilon_cutoff > 0.0 && w.epsilon_cutoff < 1.0 {
                epsilon_cutoff(scores, w.epsilon_cutoff);
            }
            if w.eta_cutoff > 0.0 && w.eta_cutoff < 1.0 {
                eta_cutoff(scores, w.eta_cutoff);
            }
        }
        if self.renormalize {
            let normalized = log_softmax(scores);
            scores.copy_from_slice(&normalized);
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

/// transformers' `EncoderRepetitionPenaltyLogitsProcessor`: the score of every token of the
/// prompt is multiplied by `penalty` when positive and divided by it when negative (once per
/// token), which makes the prompt's tokens likelier for a penalty above 1.
pub fn encoder_repetition_penalty(scores: &mut [f32], prompt: &[u32], penalty: f32) {
    // transformers keeps `1 / penalty` (in double precision) and divides and multiplies by it.
    repetition_penalty(scores, prompt, (1.0 / f64::from(penalty)) as f32);
}

/// transformers' `SequenceBiasLogitsProcessor`: adds each bias to the score of its sequence's
/// last token when `ids` end with the rest of the sequence (always, for a one-token sequence).
/// A token's biases are summed before they are added, as transformers adds one bias vector.
pub fn sequence_bias(scores: &mut [f32], ids: &[u32], biases: &[(Vec<u32>, f32)]) {
    if biases.is_empty() {
        return;
    }
    let mut total: std::collections::BTreeMap<u32, f32> = std::collections::BTreeMap::new();
    // The one-token biases first (they are set, not added), then the longer ones that match.
    for (sequence, bias) in biases.iter().filter(|(s, _)| s.len() == 1) {
        total.insert(sequence[0], *bias);
    }
    for (sequence, bias) in biases.iter().filter(|(s, _)| s.len() > 1) {
        let Some((last, prefix)) = sequence.split_last() else {
            continue;
        };
        if ids.ends_with(prefix) {
            *total.entry(*last).or_insert(0.0) += bias;
        }
    }
    for (token, bias) in total {
        if let Some(s) = scores.get_mut(token as usize) {
            *s += bias;
        }
    }
}

/// transformers' `NoRepeatNGramLogitsProcessor`: bans every token that would complete an
/// n-gram of size `n` already present in `ids`.
pub fn no_repeat_ngram(scores: &mut [f32], ids: &[u32], n: usize) {
    ban_ngrams_of(scores, ids, ids, n);
}

/// Bans every token that would make the last `n - 1` of `ids` an n-gram of `source`
/// (transformers' `EncoderNoRepeatNGramLogitsProcessor` with the encoder's prompt as `source`).
pub fn ban_ngrams_of(scores: &mut [f32], source: &[u32], ids: &[u32], n: usize) {
    if ids.len() + 1 < n {
        return;
    }
    let prefix = &ids[ids.len() + 1 - n..];
    for window in source.windows(n) {
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

/// transformers' `ForcedBOSTokenLogitsProcessor` and `ForcedEOSTokenLogitsProcessor` at their
/// step: every score becomes `-inf` but those of `ids`, which become 0.
pub fn force(scores: &mut [f32], ids: &[u32]) {
    scores.fill(FILTERED);
    for &id in ids {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = 0.0;
        }
    }
}

/// transformers' `ExponentialDecayLengthPenalty`, `steps` tokens after its start: the score of
/// every end-of-sequence id grows by its absolute value times `factor ^ steps - 1` (finite
/// scores only).
pub fn length_decay(scores: &mut [f32], eos: &[u32], factor: f32, steps: usize) {
    let growth = ((factor as f64).powi(steps as i32) - 1.0) as f32;
    let raised: Vec<(usize, f32)> = eos
        .iter()
        .map(|&id| id as usize)
        .filter(|&id| id < scores.len() && scores[id].is_finite())
        .map(|id| (id, scores[id] + scores[id].abs() * growth))
        .collect();
    for (id, score) in raised {
        scores[id] = score;
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

/// transformers' `MinPLogitsWarper`: removes the tokens whose probability is below `min_p`
/// times the most likely token's, keeping at least the `min_keep` most likely.
pub fn min_p(scores: &mut [f32], min_p: f32, min_keep: usize) {
    let probs = softmax(scores);
    let threshold = min_p * probs.iter().copied().fold(0.0, f32::max);
    // The `min_keep` most likely are kept whatever their probability (the lower id first on
    // ties, as `torch.topk` on CPU).
    let keep = min_keep.min(scores.len());
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if keep > 0 {
        order.select_nth_unstable_by(keep - 1, |&a, &b| {
            probs[b].total_cmp(&probs[a]).then(a.cmp(&b))
        });
    }
    let kept = &order[..keep];
    for (i, s) in scores.iter_mut().enumerate() {
        if probs[i] < threshold && !kept.contains(&i) {
            *s = FILTERED;
        }
    }
}

/// transformers' `EpsilonLogitsWarper`: removes the tokens less likely than `epsilon`, except
/// the most likely.
pub fn epsilon_cutoff(scores: &mut [f32], epsilon: f32) {
    cut_below(scores, &softmax(scores), epsilon);
}

/// transformers' `EtaLogitsWarper`: removes the tokens less likely than
/// `min(epsilon, sqrt(epsilon) * exp(-entropy))`, except the most likely.
pub fn eta_cutoff(scores: &mut [f32], epsilon: f32) {
    let probs = softmax(scores);
    let entropy: f32 = -log_softmax(scores)
        .iter()
        .zip(&probs)
        .filter(|(_, &p)| p > 0.0)
        .map(|(&l, &p)| l * p)
        .sum::<f32>();
    let eta = epsilon.min(epsilon.sqrt() * (-entropy).exp());
    cut_below(scores, &probs, eta);
}

/// Filters the tokens whose probability is below `threshold`, except those with the largest
/// score.
fn cut_below(scores: &mut [f32], probs: &[f32], threshold: f32) {
    let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (s, &p) in scores.iter_mut().zip(probs) {
        if p < threshold && *s < top {
            *s = FILTERED;
        }
    }
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
pub fn log_softmax(scores: &[f32]) -> Vec<f32> {
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
        /// The arguments of the cases that take more than a number.
        specs: serde_json::Value,
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
            specs: v["specs"].clone(),
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
        check("min_p_0.1", |s, _| min_p(s, 0.1, 1));
        check("min_p_0.6", |s, _| min_p(s, 0.6, 1));
        check("suppress_tokens_3_7_11", |s, _| suppress(s, &[3, 7, 11]));
        check("begin_suppress_tokens_4_5", |s, _| suppress(s, &[4, 5]));
        check("forced_eos_2_8", |s, _| force(s, &[2, 8]));
        check("forced_bos_6", |s, _| force(s, &[6]));
        check("exponential_decay_2_1.5_step_3", |s, _| {
            length_decay(s, &[2, 9], 1.5, 3)
        });
        check("epsilon_0.02", |s, _| epsilon_cutoff(s, 0.02));
        check("epsilon_0.1", |s, _| epsilon_cutoff(s, 0.1));
        check("eta_0.02", |s, _| eta_cutoff(s, 0.02));
        check("eta_0.5", |s, _| eta_cutoff(s, 0.5));
        check("encoder_repetition_penalty_1.5", |s, ids| {
            encoder_repetition_penalty(s, &ids[..ENCODER_LEN], 1.5)
        });
        check("encoder_repetition_penalty_0.5", |s, ids| {
            encoder_repetition_penalty(s, &ids[..ENCODER_LEN], 0.5)
        });
        for n in 1..=3 {
            check(&format!("encoder_no_repeat_ngram_{n}"), |s, ids| {
                ban_ngrams_of(s, &ids[..ENCODER_LEN], ids, n)
            });
        }
        check("renormalize", |s, _| {
            let normalized = log_softmax(s);
            s.copy_from_slice(&normalized)
        });
    }

    /// The encoder processors' input in processors.json: the first ids of each row.
    const ENCODER_LEN: usize = 7;

    /// A pipeline of `config` (end-of-sequence id 5, which only bad words read here) at the
    /// first step on the recorded rows.
    fn check_pipeline(name: &str, config: GenerationConfig) {
        let pipeline = LogitsPipeline::new(&config, &[5]);
        check(name, |s, ids| {
            pipeline.apply(
                s,
                History {
                    ids,
                    prompt: &[],
                    padding: 0,
                    new_tokens: 0,
                },
            )
        });
    }

    #[test]
    fn sequence_biases_and_bad_words_match_transformers() {
        let specs = &recorded().specs;
        check_pipeline(
            "sequence_bias",
            GenerationConfig {
                sequence_bias: serde_json::from_value(specs["sequence_bias"].clone()).unwrap(),
                ..GenerationConfig::default()
            },
        );
        // The ban of the lone end-of-sequence id 5 is dropped, as transformers drops it.
        check_pipeline(
            "bad_words_ids",
            GenerationConfig {
                bad_words_ids: serde_json::from_value(specs["bad_words_ids"].clone()).unwrap(),
                ..GenerationConfig::default()
            },
        );
    }

    #[test]
    fn suppressions_min_p_and_renormalisation_follow_transformers_order() {
        let config = GenerationConfig {
            do_sample: true,
            repetition_penalty: 1.2,
            suppress_tokens: vec![3, 7],
            begin_suppress_tokens: vec![4],
            temperature: 0.8,
            top_k: 12,
            min_p: Some(0.1),
            renormalize_logits: true,
            ..GenerationConfig::default()
        };
        check_pipeline("pipeline_suppress_min_p_renormalize", config);
    }

    /// The scores of a pipeline of `config` at a step with `ids` of which `new_tokens` are new.
    fn processed(config: &GenerationConfig, ids: &[u32], new_tokens: usize) -> Vec<f32> {
        let mut scores = vec![1.0, 2.0, 3.0, 4.0];
        LogitsPipeline::new(config, &[]).apply(
            &mut scores,
            History {
                ids,
                prompt: &ids[..ids.len() - new_tokens],
                padding: 0,
                new_tokens,
            },
        );
        scores
    }

    const NO: f32 = f32::NEG_INFINITY;

    #[test]
    fn a_forced_bos_applies_at_length_one_and_then_begin_suppression_moves_to_the_next_step() {
        let config = GenerationConfig {
            forced_bos_token_id: Some(2),
            begin_suppress_tokens: vec![3],
            ..GenerationConfig::default()
        };
        assert_eq!(processed(&config, &[0], 0), [NO, NO, 0.0, NO]);
        assert_eq!(processed(&config, &[0, 2], 1), [1.0, 2.0, 3.0, NO]);
        assert_eq!(processed(&config, &[0, 2, 1], 2), [1.0, 2.0, 3.0, 4.0]);
        // A longer start: no forced token, and the first step is the one suppressed.
        assert_eq!(processed(&config, &[0, 1], 0), [1.0, 2.0, 3.0, NO]);
    }

    #[test]
    fn a_forced_eos_applies_only_at_the_last_step_max_new_tokens_allows() {
        let config = GenerationConfig {
            max_new_tokens: 3,
            forced_eos_token_id: Some(vec![1, 3]),
            ..GenerationConfig::default()
        };
        assert_eq!(processed(&config, &[0, 1, 2], 1), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(processed(&config, &[0, 1, 2, 3], 2), [NO, 0.0, NO, 0.0]);
    }

    #[test]
    fn min_p_keeps_the_tokens_at_least_that_share_of_the_most_likely() {
        // Probabilities proportional to 1, e, e^2, e^3: e^-2 = 0.135 of the top for token 1.
        let mut scores = vec![1.0, 2.0, 3.0, 4.0];
        min_p(&mut scores, 0.13, 1);
        assert_eq!(scores, [NO, 2.0, 3.0, 4.0]);
        let mut ties = vec![5.0, 5.0, 1.0];
        min_p(&mut ties, 1.0, 1);
        assert_eq!(ties, [5.0, 5.0, NO]);
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
        check_pipeline("pipeline", config);
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
                prompt: &[],
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
                prompt: &[],
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
                prompt: &[],
                padding: 2,
                new_tokens: 0,
            },
        );
        assert_eq!(scores, [4.0, 4.0, 2.0]);
    }
}
