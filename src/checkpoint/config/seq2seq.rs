//! The encoder–decoder part of `config.json` (BART, T5): their spellings of the sizes the
//! other families share, and what only an encoder–decoder has (the decoder's depth and start
//! token, T5's relative position buckets and gated feed-forward, BART's embedding scale).

use super::{Activation, RawConfig};

/// T5's relative position buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelativeBuckets {
    /// Buckets per direction pair (`relative_attention_num_buckets`).
    pub num_buckets: usize,
    /// Distances from this one on share the last bucket (`relative_attention_max_distance`).
    pub max_distance: usize,
}

/// What an encoder–decoder adds to the shared configuration (whose `num_layers`,
/// `num_heads` and `intermediate_size` are the encoder's, and the decoder's too).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Seq2SeqConfig {
    /// Blocks of the decoder.
    pub decoder_layers: usize,
    /// The token the decoder starts from.
    pub decoder_start_token_id: u32,
    /// The padding id (BART's `forward` shifts `input_ids` right to make the decoder's input
    /// when none is given, filling with it).
    pub pad_token_id: u32,
    /// T5's relative position buckets (`None`: BART's learned positions).
    pub relative_buckets: Option<RelativeBuckets>,
    /// T5's gated feed-forward (`gated-gelu`: `wo(act(wi_0 x) * wi_1 x)`).
    pub gated: bool,
    /// BART's `scale_embedding`: token embeddings times the square root of the width.
    pub scale_embedding: bool,
    /// T5's decoder output times `d_model^-0.5` before the LM head: the original T5 (whose
    /// head is the embedding), not T5 v1.1. transformers 5 writes `scale_decoder_outputs`;
    /// earlier versions meant it by `tie_word_embeddings` (default true).
    pub scale_decoder_outputs: bool,
}

impl RawConfig {
    /// For BART and T5, moves their spellings of the shared sizes into the shared fields and
    /// resolves the rest; `None` for the other families. The error names the field.
    pub(super) fn resolve_seq2seq(&mut self) -> Result<Option<Seq2SeqConfig>, String> {
        let model_type = self.model_type.clone().unwrap_or_default();
        let (encoder_layers, decoder_layers) = match model_type.as_str() {
            "bart" => (self.encoder_layers, self.decoder_layers),
            "t5" => (self.num_hidden_layers, self.num_decoder_layers),
            _ => return Ok(None),
        };
        self.hidden_size = self.hidden_size.or(self.d_model);
        self.head_dim = self.head_dim.or(self.d_kv);
        self.num_hidden_layers = encoder_layers;
        self.num_attention_heads = self.num_attention_heads.or(self.encoder_attention_heads);
        self.intermediate_size = self
            .intermediate_size
            .or(self.d_ff)
            .or(self.encoder_ffn_dim);
        for (field, decoder, encoder) in [
            (
                "decoder_attention_heads",
                self.decoder_attention_heads,
                self.num_attention_heads,
            ),
            (
                "decoder_ffn_dim",
                self.decoder_ffn_dim,
                self.intermediate_size,
            ),
        ] {
            if let (Some(d), Some(e)) = (decoder, encoder) {
                if d != e {
                    return Err(format!(
                        "{field} ({d}) differs from the encoder's ({e}); only encoder–decoders whose decoder is as wide as the encoder are supported"
                    ));
                }
            }
        }
        if self.normalize_before == Some(true) || self.add_final_layer_norm == Some(true) {
            return Err(
                "BART with pre-LayerNorm blocks (normalize_before, add_final_layer_norm: mBART's layout) is not supported".into(),
            );
        }
        let decoder_layers = match decoder_layers.or(encoder_layers) {
            Some(0) => return Err("the decoder has 0 layers".into()),
            Some(n) => n,
            None => return Err("the field `decoder_layers` is missing".into()),
        };
        let pad_token_id = self.pad_token_id.unwrap_or(match model_type.as_str() {
            "bart" => 1,
            _ => 0,
        });
        let (gated, relative_buckets) = match model_type.as_str() {
            "t5" => {
                let projection = self.feed_forward_proj.as_deref().unwrap_or("relu");
                let (gated, act) = match projection.strip_prefix("gated-") {
                    // transformers' T5 reads `gated-gelu` as the tanh approximation.
                    Some("gelu") => (true, "gelu_new"),
                    Some(act) => (true, act),
                    None => (false, projection),
                };
                if Activation::from_name(act).is_none() {
                    return Err(format!("feed_forward_proj `{projection}` is not supported"));
                }
                self.hidden_act = Some(act.to_string());
                let buckets = RelativeBuckets {
                    num_buckets: self.relative_attention_num_buckets.unwrap_or(32),
                    max_distance: self.relative_attention_max_distance.unwrap_or(128),
                };
                if buckets.num_buckets < 4 || buckets.max_distance < 2 {
                    return Err(format!(
                        "relative_attention_num_buckets ({}) must be at least 4 and relative_attention_max_distance ({}) at least 2",
                        buckets.num_buckets, buckets.max_distance
                    ));
                }
                (gated, Some(buckets))
            }
            _ => (false, None),
        };
        Ok(Some(Seq2SeqConfig {
            decoder_layers,
            decoder_start_token_id: self.decoder_start_token_id.unwrap_or(pad_token_id),
            pad_token_id,
            relative_buckets,
            gated,
            scale_embedding: self.scale_embedding.unwrap_or(false),
            scale_decoder_outputs: model_type == "t5"
                && self
                    .scale_decoder_outputs
                    .unwrap_or(self.tie_word_embeddings != Some(false)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Family, ModelConfig, RawConfig};

    fn resolve(json: serde_json::Value) -> Result<ModelConfig, String> {
        RawConfig::from_value(json)?.resolve()
    }

    fn bart() -> serde_json::Value {
        serde_json::json!({"model_type": "bart", "vocab_size": 50, "d_model": 16,
            "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
            "decoder_start_token_id": 2})
    }

    #[test]
    fn bart_spellings_resolve_into_the_shared_fields() {
        let c = resolve(bart()).unwrap();
        assert_eq!(c.family, Family::Bart);
        assert_eq!((c.hidden_size, c.num_layers, c.num_heads), (16, 2, 4));
        assert_eq!(
            (c.intermediate_size, c.head_dim, c.max_positions),
            (32, 4, 1024)
        );
        let s = c.seq2seq.unwrap();
        assert_eq!(
            (s.decoder_layers, s.decoder_start_token_id, s.pad_token_id),
            (3, 2, 1)
        );
        assert!(s.relative_buckets.is_none() && !s.scale_decoder_outputs);
    }

    #[test]
    fn a_decoder_wider_than_the_encoder_and_mbart_are_refused_by_name() {
        let mut wide = bart();
        wide["decoder_ffn_dim"] = 64.into();
        assert!(resolve(wide).unwrap_err().contains("decoder_ffn_dim (64)"));
        let mut mbart = bart();
        mbart["normalize_before"] = true.into();
        assert!(resolve(mbart).unwrap_err().contains("normalize_before"));
    }

    #[test]
    fn t5_scales_its_decoder_output_as_transformers_4_and_5_say() {
        let t5 = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"model_type": "t5", "vocab_size": 50,
                "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2, "num_heads": 4});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            resolve(c)
        };
        let original = t5(serde_json::json!({})).unwrap();
        let s = original.seq2seq.unwrap();
        assert!(s.scale_decoder_outputs && !s.gated);
        assert_eq!((s.decoder_layers, s.decoder_start_token_id), (2, 0));
        assert_eq!(original.activation, super::Activation::Relu);
        let v1_1 = t5(serde_json::json!({"tie_word_embeddings": false,
            "feed_forward_proj": "gated-gelu"}))
        .unwrap();
        assert!(!v1_1.seq2seq.as_ref().unwrap().scale_decoder_outputs);
        assert!(v1_1.seq2seq.unwrap().gated);
        assert_eq!(v1_1.activation, super::Activation::GeluTanh);
        let written_by_5 = t5(serde_json::json!({"tie_word_embeddings": true,
            "scale_decoder_outputs": false}))
        .unwrap();
        assert!(!written_by_5.seq2seq.unwrap().scale_decoder_outputs);
        let unknown = t5(serde_json::json!({"feed_forward_proj": "gated-mish"}));
        assert!(unknown.unwrap_err().contains("gated-mish"));
    }
}
