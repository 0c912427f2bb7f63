//! Rotary-embedding parameters of a `config.json`, resolved the way transformers 5.25
//! (`modeling_rope_utils.py`, `RotaryEmbeddingConfigMixin`) reads them: the 5.x `rope_parameters`
//! dict (flat, or nested per layer type as Gemma 3 writes it) and the 4.x top-level `rope_theta`
//! with a `rope_scaling` dict (keyed `rope_type` or `type`), plus Gemma 3's 4.x
//! `rope_local_base_freq`. Every default transformers derives from elsewhere in the config
//! (`original_max_position_embeddings`, a yarn or longrope `factor`) is decided here, so the
//! model code only computes frequencies.

use serde_json::{Map, Value};

/// The `rope_type` values [`resolve_rope`] understands.
pub const SUPPORTED_ROPE_TYPES: [&str; 6] =
    ["default", "linear", "dynamic", "yarn", "longrope", "llama3"];

/// Gemma 3's base frequency of its sliding-window layers when the config names none
/// (transformers' `Gemma3TextConfig.default_theta["local"]`).
pub const DEFAULT_SLIDING_THETA: f64 = 10_000.0;

/// The rotary settings of one kind of attention layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeConfig {
    /// Base frequency (`rope_theta`).
    pub theta: f64,
    /// How the frequencies of `theta` are scaled.
    pub scaling: RopeScaling,
}

/// A frequency scaling (`rope_type`), with the values transformers uses for it, defaults and
/// derived values already resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScaling {
    /// `default`: the plain frequencies `theta^(-2i/d)`.
    #[serde(rename = "default")]
    None,
    /// `linear` (position interpolation): every frequency divided by `factor`.
    Linear {
        /// The divisor of the frequencies.
        factor: f64,
    },
    /// `dynamic` (dynamic NTK): the base grows with the sequence once it passes
    /// `original_max_positions`; see `Rotary` in `models::rope` for the per-call state.
    Dynamic {
        /// The NTK scaling factor.
        factor: f64,
        /// `max_position_embeddings`: the length up to which the frequencies are the plain ones.
        original_max_positions: usize,
    },
    /// `yarn`: interpolated and extrapolated frequencies blended by a linear ramp over the
    /// correction range of `beta_fast`/`beta_slow`, and cos/sin multiplied by an attention factor.
    Yarn {
        /// The scaling factor (`max_position_embeddings / original_max_position_embeddings`
        /// when the config writes `"factor": null`).
        factor: f64,
        /// The pre-training context length the correction range is computed against.
        original_max_positions: usize,
        /// Rotations bounding the extrapolated band (32 when absent, null or 0).
        beta_fast: f64,
        /// Rotations bounding the interpolated band (1 when absent, null or 0).
        beta_slow: f64,
        /// YaRN's `mscale` (None when absent, null or 0).
        mscale: Option<f64>,
        /// YaRN's `mscale_all_dim` (None when absent, null or 0).
        mscale_all_dim: Option<f64>,
        /// An explicit cos/sin multiplier, overriding the one derived from `factor` and the mscales.
        attention_factor: Option<f64>,
        /// Whether the correction range is rounded outwards to whole dimensions (`truncate`,
        /// true by default; transformers reads it only from a flat dict, so it is always true in
        /// the per-layer-type form).
        truncate: bool,
    },
    /// `longrope` (Phi-3): per-frequency divisors, the short ones up to
    /// `original_max_positions` and the long ones beyond, and an attention factor.
    LongRope {
        /// Divisors of the frequencies for sequences up to `original_max_positions`.
        short_factor: Vec<f64>,
        /// Divisors of the frequencies for longer sequences.
        long_factor: Vec<f64>,
        /// The pre-training context length (Phi-3's top-level value wins over the nested one).
        original_max_positions: usize,
        /// An explicit cos/sin multiplier, overriding the one derived from `factor`.
        attention_factor: Option<f64>,
        /// The context extension, from which the attention factor is derived when not explicit:
        /// the config's `factor`, else `max_position_embeddings / original_max_positions`.
        factor: f64,
    },
    /// `llama3` (Llama 3.1): low frequencies divided by `factor`, high ones kept, a smooth blend
    /// in between.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_positions / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_positions / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_positions: usize,
    },
}

impl RopeScaling {
    /// The `rope_type` name of this scaling.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::None => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }
}

impl RopeConfig {
    /// Plain rotary positions of base `theta`.
    pub fn plain(theta: f64) -> Self {
        RopeConfig {
            theta,
            scaling: RopeScaling::None,
        }
    }

    /// Checks the settings against the rotary width `rotary_dim` (the dimensions of a head that
    /// are rotated): it must be even and positive, and longrope's factor lists must have
    /// `rotary_dim / 2` entries.
    pub fn check(&self, rotary_dim: usize) -> Result<(), String> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(format!(
                "the rotary dimension must be even and positive, got {rotary_dim}"
            ));
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &self.scaling
        {
            for (name, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if list.len() != rotary_dim / 2 {
                    return Err(format!(
                        "rope `{name}` has {} entries, but the rotary dimension {rotary_dim} needs {}",
                        list.len(),
                        rotary_dim / 2
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The rotary settings of a model: those of its full-attention layers and, for models whose
/// sliding-window layers have their own (Gemma 3), those of the sliding layers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeConfigs {
    /// Full-attention layers (every layer of a model without per-layer-type settings).
    pub full: RopeConfig,
    /// Sliding-window layers, where the config gives them their own settings (the
    /// `sliding_attention` entry of a per-layer-type `rope_parameters`, or 4.x
    /// `rope_local_base_freq`); None otherwise.
    pub sliding: Option<RopeConfig>,
}

/// The rotary fields of a `config.json`, as read from it.
#[derive(Debug, Clone, Copy)]
pub struct RopeInput<'a> {
    /// transformers 5.x `rope_parameters` (flat, or nested by layer type).
    pub rope_parameters: Option<&'a Value>,
    /// transformers 4.x `rope_scaling` (takes precedence over `rope_parameters`, as in
    /// transformers; merged into the `full_attention` entry of a nested `rope_parameters`).
    pub rope_scaling: Option<&'a Value>,
    /// Top-level `rope_theta` (4.x), used where the dict names none.
    pub rope_theta: Option<f64>,
    /// Gemma 3's 4.x base frequency of its sliding layers (which are never scaled).
    pub rope_local_base_freq: Option<f64>,
    /// Top-level `max_position_embeddings`.
    pub max_position_embeddings: Option<usize>,
    /// Top-level `original_max_position_embeddings` (Phi-3 writes it there); it wins over the
    /// dict's for llama3, yarn and longrope in the flat form.
    pub original_max_position_embeddings: Option<usize>,
    /// The family's base frequency when the config names none (transformers' `default_theta`).
    pub default_theta: f64,
}

/// Resolves the rotary settings of a config, or says which field is missing or wrong.
pub fn resolve_rope(input: &RopeInput) -> Result<RopeConfigs, String> {
    let scaling = object("rope_scaling", input.rope_scaling)?.filter(|m| !m.is_empty());
    let params = object("rope_parameters", input.rope_parameters)?;
    let full_theta = input.rope_theta.unwrap_or(input.default_theta);
    if let Some(params) = params.filter(|p| is_nested(p)) {
        // Per layer type (Gemma 3, transformers 5.x); 4.x `rope_scaling` updates the full entry.
        let mut full = object(
            "rope_parameters.full_attention",
            params.get("full_attention"),
        )?
        .cloned()
        .unwrap_or_default();
        if let Some(scaling) = scaling {
            full.extend(scaling.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let sliding = object(
            "rope_parameters.sliding_attention",
            params.get("sliding_attention"),
        )?
        .cloned()
        .unwrap_or_default();
        let sliding_theta = input.rope_local_base_freq.unwrap_or(DEFAULT_SLIDING_THETA);
        return Ok(RopeConfigs {
            full: parse_entry(
                &full,
                "rope_parameters.full_attention",
                full_theta,
                input,
                true,
            )?,
            sliding: Some(parse_entry(
                &sliding,
                "rope_parameters.sliding_attention",
                sliding_theta,
                input,
                true,
            )?),
        });
    }
    let (dict, name) = match (scaling, params) {
        (Some(s), _) => (s.clone(), "rope_scaling"),
        (None, Some(p)) => (p.clone(), "rope_parameters"),
        (None, None) => (Map::new(), "rope_parameters"),
    };
    let full = parse_entry(&dict, name, full_theta, input, false)?;
    let sliding = match input.rope_local_base_freq {
        Some(theta) => Some(RopeConfig::plain(positive("rope_local_base_freq", theta)?)),
        None => None,
    };
    Ok(RopeConfigs { full, sliding })
}

/// `partial_rotary_factor` as transformers 5.x nests it in `rope_parameters` (in the flat form,
/// or in the `full_attention` entry of the per-layer-type form); None when absent.
pub fn partial_rotary_factor(rope_parameters: Option<&Value>) -> Option<f64> {
    let params = rope_parameters?.as_object()?;
    let params = match is_nested(params) {
        true => params.get("full_attention")?.as_object()?,
        false => params,
    };
    params.get("partial_rotary_factor")?.as_f64()
}

/// Whether `rope_parameters` is keyed by layer type rather than a flat dict.
fn is_nested(params: &Map<String, Value>) -> bool {
    !params.contains_key("rope_type")
        && !params.contains_key("type")
        && (params.contains_key("full_attention") || params.contains_key("sliding_attention"))
}

/// `value` as a JSON object; null and absent are None.
fn object<'a>(
    name: &str,
    value: Option<&'a Value>,
) -> Result<Option<&'a Map<String, Value>>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(format!("`{name}` must be an object, got {other}")),
    }
}

/// One flat rope dict (`section` names it in messages); `nested` is the per-layer-type form.
fn parse_entry(
    dict: &Map<String, Value>,
    section: &str,
    theta_fallback: f64,
    input: &RopeInput,
    nested: bool,
) -> Result<RopeConfig, String> {
    let field = Fields { dict, section };
    let rope_type = match (dict.get("rope_type"), dict.get("type")) {
        (Some(Value::String(t)), _) => t.as_str(),
        (Some(Value::Null) | None, Some(Value::String(t))) => t.as_str(),
        (Some(Value::Null) | None, None | Some(Value::Null)) => "default",
        (Some(other), _) | (_, Some(other)) => {
            return Err(format!(
                "`{section}.rope_type` must be a string, got {other}"
            ))
        }
    };
    let theta = positive(
        &format!("{section}.rope_theta"),
        field.number("rope_theta")?.unwrap_or(theta_fallback),
    )?;
    // llama3, yarn and longrope: the pre-training length, Phi-3's top-level value first (flat
    // form only), then the dict's, then `max_position_embeddings`.
    let original = || -> Result<usize, String> {
        let top = if nested {
            None
        } else {
            input.original_max_position_embeddings
        };
        let value = match top {
            Some(v) => Some(v),
            None => field.count("original_max_position_embeddings")?,
        }
        .or(input.max_position_embeddings);
        match value {
            Some(0) => Err(format!(
                "`{section}.original_max_position_embeddings` must be positive"
            )),
            Some(v) => Ok(v),
            None => Err(format!(
                "rope_type `{rope_type}` needs `{section}.original_max_position_embeddings` (or `max_position_embeddings`)"
            )),
        }
    };
    let max_positions = |why: &str| -> Result<usize, String> {
        match input.max_position_embeddings {
            Some(0) => Err("`max_position_embeddings` must be positive".into()),
            Some(v) => Ok(v),
            None => Err(format!(
                "rope_type `{rope_type}` needs `max_position_embeddings` {why}"
            )),
        }
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: field.factor()?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: field.factor()?,
            original_max_positions: max_positions("(the length dynamic scaling starts at)")?,
        },
        "yarn" => {
            let original_max_positions = original()?;
            // transformers requires the key; an explicit null derives the factor.
            let factor = match dict.get("factor") {
                None => return Err(field.missing("factor")),
                Some(Value::Null) => positive(
                    &format!("{section}.factor"),
                    max_positions("(to derive a null `factor`)")? as f64
                        / original_max_positions as f64,
                )?,
                Some(_) => field.factor()?,
            };
            // transformers writes `x or default`, so 0 counts as absent.
            let nonzero = |name: &str| -> Result<Option<f64>, String> {
                Ok(field.number(name)?.filter(|v| *v != 0.0))
            };
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast: nonzero("beta_fast")?.unwrap_or(32.0),
                beta_slow: nonzero("beta_slow")?.unwrap_or(1.0),
                mscale: nonzero("mscale")?,
                mscale_all_dim: nonzero("mscale_all_dim")?,
                attention_factor: field.number("attention_factor")?,
                // `get("truncate", True)` on the flat dict: null reads as false; the nested form
                // never finds the key.
                truncate: match (nested, dict.get("truncate")) {
                    (true, _) | (false, None) => true,
                    (false, Some(Value::Null)) => false,
                    (false, Some(Value::Bool(b))) => *b,
                    (false, Some(other)) => {
                        return Err(format!(
                            "`{section}.truncate` must be a boolean, got {other}"
                        ))
                    }
                },
            }
        }
        "longrope" => {
            let original_max_positions = original()?;
            let factor = match field.number("factor")? {
                Some(f) => positive(&format!("{section}.factor"), f)?,
                None => {
                    max_positions("(to derive `factor`)")? as f64 / original_max_positions as f64
                }
            };
            RopeScaling::LongRope {
                short_factor: field.list("short_factor")?,
                long_factor: field.list("long_factor")?,
                original_max_positions,
                attention_factor: field.number("attention_factor")?,
                factor,
            }
        }
        "llama3" => RopeScaling::Llama3 {
            factor: field.factor()?,
            low_freq_factor: field.required("low_freq_factor")?,
            high_freq_factor: field.required("high_freq_factor")?,
            original_max_positions: original()?,
        },
        other => {
            return Err(format!(
                "rope_type `{other}` is not supported (supported: {})",
                SUPPORTED_ROPE_TYPES.join(", ")
            ))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// `value` if it is finite and positive, else an error naming `name`.
fn positive(name: &str, value: f64) -> Result<f64, String> {
    match value.is_finite() && value > 0.0 {
        true => Ok(value),
        false => Err(format!("`{name}` must be a positive number, got {value}")),
    }
}

/// Typed reads of one rope dict's fields, with messages naming `section.field`.
struct Fields<'a> {
    dict: &'a Map<String, Value>,
    section: &'a str,
}

impl Fields<'_> {
    fn missing(&self, name: &str) -> String {
        let rope_type = self
            .dict
            .get("rope_type")
            .or(self.dict.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        format!("rope_type `{rope_type}` needs `{}.{name}`", self.section)
    }

    /// A number, or None when absent or null.
    fn number(&self, name: &str) -> Result<Option<f64>, String> {
        match self.dict.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64().filter(|f| f.is_finite()) {
                Some(f) => Ok(Some(f)),
                None => Err(format!(
                    "`{}.{name}` must be a number, got {v}",
                    self.section
                )),
            },
        }
    }

    fn required(&self, name: &str) -> Result<f64, String> {
        self.number(name)?.ok_or_else(|| self.missing(name))
    }

    /// The required, positive `factor`.
    fn factor(&self) -> Result<f64, String> {
        positive(
            &format!("{}.factor", self.section),
            self.required("factor")?,
        )
    }

    /// A whole count, or None when absent or null.
    fn count(&self, name: &str) -> Result<Option<usize>, String> {
        match self.number(name)? {
            None => Ok(None),
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= usize::MAX as f64 => {
                Ok(Some(f as usize))
            }
            Some(f) => Err(format!(
                "`{}.{name}` must be a whole number, got {f}",
                self.section
            )),
        }
    }

    /// A required, non-empty list of positive numbers.
    fn list(&self, name: &str) -> Result<Vec<f64>, String> {
        let wrong = |v: &Value| {
            format!(
                "`{}.{name}` must be a list of positive numbers, got {v}",
                self.section
            )
        };
        match self.dict.get(name) {
            None | Some(Value::Null) => Err(self.missing(name)),
            Some(v @ Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|x| {
                    x.as_f64()
                        .filter(|f| f.is_finite() && *f > 0.0)
                        .ok_or_else(|| wrong(v))
                })
                .collect(),
            Some(v) => Err(wrong(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input<'a>(params: Option<&'a Value>, scaling: Option<&'a Value>) -> RopeInput<'a> {
        RopeInput {
            rope_parameters: params,
            rope_scaling: scaling,
            rope_theta: None,
            rope_local_base_freq: None,
            max_position_embeddings: Some(4096),
            original_max_position_embeddings: None,
            default_theta: 10_000.0,
        }
    }

    fn resolve(params: Value) -> Result<RopeConfigs, String> {
        resolve_rope(&input(Some(&params), None))
    }

    #[test]
    fn rope_nothing_is_plain_default_theta() {
        let r = resolve_rope(&input(None, None)).unwrap();
        assert_eq!(r.full, RopeConfig::plain(10_000.0));
        assert_eq!(r.sliding, None);
        let mut i = input(None, None);
        i.rope_theta = Some(500_000.0);
        assert_eq!(resolve_rope(&i).unwrap().full.theta, 500_000.0);
    }

    #[test]
    fn rope_5x_flat_layout() {
        let r = resolve(json!({"rope_type": "default", "rope_theta": 1e6})).unwrap();
        assert_eq!(r.full, RopeConfig::plain(1e6));
        let r = resolve(json!({"rope_type": "linear", "rope_theta": 1e4, "factor": 4}));
        assert_eq!(r.unwrap().full.scaling, RopeScaling::Linear { factor: 4.0 });
        let r = resolve(json!({"rope_type": "dynamic", "factor": 2.0})).unwrap();
        assert_eq!(
            r.full,
            RopeConfig {
                theta: 10_000.0,
                scaling: RopeScaling::Dynamic {
                    factor: 2.0,
                    original_max_positions: 4096
                }
            }
        );
        let r = resolve(json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "some_future_key": [1, 2]}))
        .unwrap();
        assert_eq!(
            r.full.scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 8192
            }
        );
        assert_eq!(r.full.theta, 500_000.0);
    }

    #[test]
    fn rope_yarn_defaults_and_derivations() {
        let r =
            resolve(json!({"rope_type": "yarn", "factor": 4.0, "mscale": 0, "beta_fast": null}));
        assert_eq!(
            r.unwrap().full.scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_positions: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true
            }
        );
        let r = resolve(
            json!({"rope_type": "yarn", "factor": null, "truncate": false,
            "original_max_position_embeddings": 1024, "mscale": 1.0, "mscale_all_dim": 0.8,
            "attention_factor": 0.9, "beta_fast": 16, "beta_slow": 2}),
        );
        assert_eq!(
            r.unwrap().full.scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_positions: 1024,
                beta_fast: 16.0,
                beta_slow: 2.0,
                mscale: Some(1.0),
                mscale_all_dim: Some(0.8),
                attention_factor: Some(0.9),
                truncate: false
            }
        );
        let r = resolve(json!({"rope_type": "yarn", "factor": 2.0, "truncate": null}));
        assert!(matches!(
            r.unwrap().full.scaling,
            RopeScaling::Yarn {
                truncate: false,
                ..
            }
        ));
    }

    #[test]
    fn rope_longrope_and_phi3_top_level_original() {
        let p = json!({"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2, 3],
            "original_max_position_embeddings": 1024});
        let mut i = input(None, Some(&p));
        let r = resolve_rope(&i).unwrap();
        assert_eq!(
            r.full.scaling,
            RopeScaling::LongRope {
                short_factor: vec![1.0, 1.5],
                long_factor: vec![2.0, 3.0],
                original_max_positions: 1024,
                attention_factor: None,
                factor: 4.0
            }
        );
        i.original_max_position_embeddings = Some(2048);
        match resolve_rope(&i).unwrap().full.scaling {
            RopeScaling::LongRope {
                original_max_positions,
                factor,
                ..
            } => assert_eq!((original_max_positions, factor), (2048, 2.0)),
            other => panic!("{other:?}"),
        }
        assert!(r.full.check(4).is_ok());
        let e = r.full.check(8).unwrap_err();
        assert!(e.contains("short_factor") && e.contains("needs 4"), "{e}");
        assert!(RopeConfig::plain(1e4).check(7).is_err());
    }

    #[test]
    fn rope_4x_layout() {
        let s = json!({"type": "linear", "factor": 2.0});
        let mut i = input(None, Some(&s));
        i.rope_theta = Some(5e5);
        let r = resolve_rope(&i).unwrap();
        assert_eq!(r.full.theta, 5e5);
        assert_eq!(r.full.scaling, RopeScaling::Linear { factor: 2.0 });
        // `rope_type` wins over `type`; rope_scaling wins over rope_parameters.
        let s = json!({"rope_type": "dynamic", "type": "linear", "factor": 2.0});
        let p = json!({"rope_type": "default", "rope_theta": 7.0});
        let mut i = input(Some(&p), Some(&s));
        i.rope_theta = Some(5e5);
        let r = resolve_rope(&i).unwrap();
        assert_eq!(r.full.theta, 5e5);
        assert_eq!(r.full.scaling.rope_type(), "dynamic");
        // A null or empty rope_scaling falls back to rope_parameters.
        let empty = json!({});
        let r = resolve_rope(&input(Some(&p), Some(&empty))).unwrap();
        assert_eq!(r.full, RopeConfig::plain(7.0));
        let r = resolve_rope(&input(Some(&p), Some(&Value::Null))).unwrap();
        assert_eq!(r.full, RopeConfig::plain(7.0));
    }

    #[test]
    fn rope_gemma3_per_layer_type_and_4x() {
        let p = json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}});
        let r = resolve(p).unwrap();
        assert_eq!(
            r.full,
            RopeConfig {
                theta: 1e6,
                scaling: RopeScaling::Linear { factor: 8.0 }
            }
        );
        assert_eq!(r.sliding, Some(RopeConfig::plain(1e4)));
        // Nested yarn: transformers never sees `truncate`.
        let p = json!({"full_attention": {"rope_type": "yarn", "factor": 4.0, "truncate": false},
            "sliding_attention": null});
        let mut i = input(Some(&p), None);
        i.original_max_position_embeddings = Some(7);
        let r = resolve_rope(&i).unwrap();
        assert!(matches!(
            r.full.scaling,
            RopeScaling::Yarn {
                truncate: true,
                original_max_positions: 4096,
                ..
            }
        ));
        assert_eq!(r.sliding, Some(RopeConfig::plain(DEFAULT_SLIDING_THETA)));
        // 4.x Gemma 3: rope_scaling for the full layers, rope_local_base_freq for the sliding.
        let s = json!({"rope_type": "linear", "factor": 8.0});
        let mut i = input(None, Some(&s));
        i.rope_theta = Some(1e6);
        i.rope_local_base_freq = Some(1e4);
        let r = resolve_rope(&i).unwrap();
        assert_eq!(r.full.scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(r.full.theta, 1e6);
        assert_eq!(r.sliding, Some(RopeConfig::plain(1e4)));
    }

    #[test]
    fn rope_partial_rotary_factor() {
        assert_eq!(partial_rotary_factor(None), None);
        let p = json!({"rope_type": "default", "partial_rotary_factor": 0.5});
        assert_eq!(partial_rotary_factor(Some(&p)), Some(0.5));
        let p = json!({"full_attention": {"partial_rotary_factor": 0.25}, "sliding_attention": {}});
        assert_eq!(partial_rotary_factor(Some(&p)), Some(0.25));
        assert_eq!(
            partial_rotary_factor(Some(&json!({"rope_theta": 1.0}))),
            None
        );
    }

    #[test]
    fn rope_errors_name_the_field() {
        let err = |p: Value| resolve(p).unwrap_err();
        let e = err(json!({"rope_type": "su", "factor": 2.0}));
        assert_eq!(
            e,
            "rope_type `su` is not supported (supported: default, linear, dynamic, yarn, longrope, llama3)"
        );
        let e = err(json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}));
        assert!(e.contains("low_freq_factor"), "{e}");
        let e = err(json!({"rope_type": "linear"}));
        assert!(e.contains("`rope_parameters.factor`"), "{e}");
        let e = err(json!({"rope_type": "linear", "factor": 0}));
        assert!(e.contains("factor") && e.contains("positive"), "{e}");
        let e = err(json!({"rope_type": "dynamic", "factor": -1.0}));
        assert!(e.contains("factor"), "{e}");
        let e = err(json!({"rope_type": "linear", "factor": "2"}));
        assert!(e.contains("factor") && e.contains("number"), "{e}");
        let e = err(json!({"rope_type": "yarn"}));
        assert!(e.contains("factor"), "{e}");
        let e = err(json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": "x"}));
        assert!(e.contains("long_factor"), "{e}");
        let e = err(json!({"rope_type": "longrope", "long_factor": [1.0]}));
        assert!(e.contains("short_factor"), "{e}");
        let e = err(json!({"rope_type": 3}));
        assert!(e.contains("rope_type"), "{e}");
        let e = err(json!({"rope_type": "default", "rope_theta": -5.0}));
        assert!(e.contains("rope_theta"), "{e}");
        let e = err(
            json!({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1.5}),
        );
        assert!(e.contains("original_max_position_embeddings"), "{e}");
        let e = err(json!({"full_attention": {"rope_type": "ntk"}}));
        assert!(e.contains("`ntk`"), "{e}");
        let e = err(json!({"full_attention": {"rope_type": "linear"}}));
        assert!(e.contains("rope_parameters.full_attention.factor"), "{e}");
        let e = resolve_rope(&input(Some(&json!([1])), None)).unwrap_err();
        assert!(e.contains("rope_parameters"), "{e}");
        let mut i = input(None, None);
        i.max_position_embeddings = None;
        let p = json!({"rope_type": "dynamic", "factor": 2.0});
        i.rope_parameters = Some(&p);
        let e = resolve_rope(&i).unwrap_err();
        assert!(e.contains("max_position_embeddings"), "{e}");
        let p = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0});
        i.rope_parameters = Some(&p);
        let e = resolve_rope(&i).unwrap_err();
        assert!(e.contains("original_max_position_embeddings"), "{e}");
    }

    #[test]
    fn rope_config_serde_round_trip() {
        let c = RopeConfig {
            theta: 1e4,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 8192,
            },
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<RopeConfig>(&s).unwrap(), c);
    }
}
