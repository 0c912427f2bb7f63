//! Rotary position embeddings: the inverse frequencies of a rotary base, scaled as transformers
//! 5.25 scales them (`modeling_rope_utils.py`: linear, dynamic NTK, YaRN, LongRoPE, Llama 3), and
//! the rotation of queries and keys by the angles of their positions.
//!
//! Frequencies are computed with the float32 roundings transformers' torch code goes through
//! (float32 exponents, bases and products; Python floats where it uses Python floats), so they
//! agree with its `inv_freq` buffers to a float32 rounding or two.

use candle_core::{Device, Tensor};

use crate::checkpoint::config::rope::{RopeConfig, RopeScaling};
use crate::error::{Error, Result};

/// Rotary position embedding: the `rotate_half` layout of transformers' Llama, or GPT-J's
/// interleaved pairs, on the whole head or its first dimensions, with transformers' frequency
/// scalings and, for dynamic NTK and LongRoPE, their per-call updates.
#[derive(Debug, Clone)]
pub struct Rotary {
    /// The frequencies of the next call (`inv_freq` of transformers' rotary module).
    inv_freq: Vec<f32>,
    /// The multiplier of cos and sin (`attention_scaling`).
    attention_scaling: f64,
    interleaved: bool,
    schedule: Schedule,
}

/// How the frequencies follow the sequence length (`dynamic_rope_update`).
#[derive(Debug, Clone)]
enum Schedule {
    /// The same frequencies at every length.
    Fixed,
    /// Dynamic NTK: recomputed when a call passes the longest length seen, back to `original`
    /// when a call falls below `original_max` after having grown.
    Dynamic {
        dim: usize,
        theta: f64,
        factor: f64,
        original_max: usize,
        original: Vec<f32>,
        cached: usize,
    },
    /// LongRoPE: `long` frequencies for calls longer than `original_max`, `short` otherwise.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        original_max: usize,
    },
}

impl Rotary {
    /// For heads of width `head_dim` and base frequency `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        Rotary::partial(head_dim, theta, false)
    }

    /// On the first `rotary_dim` dimensions of each head (the others pass unchanged), pairing
    /// adjacent dimensions when `interleaved`.
    pub fn partial(rotary_dim: usize, theta: f64, interleaved: bool) -> Self {
        Rotary {
            inv_freq: plain_inv_freq(rotary_dim, theta as f32),
            attention_scaling: 1.0,
            interleaved,
            schedule: Schedule::Fixed,
        }
    }

    /// On the first `rotary_dim` dimensions of each head, with `config`'s base and scaling;
    /// fails when `rotary_dim` is odd or zero, or longrope's factor lists do not have
    /// `rotary_dim / 2` entries.
    pub fn scaled(rotary_dim: usize, config: &RopeConfig, interleaved: bool) -> Result<Self> {
        config.check(rotary_dim).map_err(Error::InvalidInput)?;
        let (dim, theta) = (rotary_dim, config.theta);
        let (inv_freq, attention_scaling, schedule) = match &config.scaling {
            RopeScaling::None => (plain_inv_freq(dim, theta as f32), 1.0, Schedule::Fixed),
            RopeScaling::Linear { factor } => {
                let inv = plain_inv_freq(dim, theta as f32);
                (divide(&inv, *factor as f32), 1.0, Schedule::Fixed)
            }
            &RopeScaling::Dynamic {
                factor,
                original_max_positions,
            } => {
                let original = dynamic_initial_inv_freq(dim, theta, factor, original_max_positions);
                let schedule = Schedule::Dynamic {
                    dim,
                    theta,
                    factor,
                    original_max: original_max_positions,
                    original: original.clone(),
                    cached: original_max_positions,
                };
                (original, 1.0, schedule)
            }
            &RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let inv = yarn_inv_freq(
                    dim,
                    theta,
                    factor,
                    original_max_positions,
                    (beta_fast, beta_slow),
                    truncate,
                );
                let scaling = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                    _ => yarn_mscale(factor, 1.0),
                });
                (inv, scaling, Schedule::Fixed)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_positions,
                attention_factor,
                factor,
            } => {
                let short = longrope_inv_freq(dim, theta as f32, short_factor);
                let long = longrope_inv_freq(dim, theta as f32, long_factor);
                let scaling = attention_factor.unwrap_or(match *factor <= 1.0 {
                    true => 1.0,
                    false => (1.0 + factor.ln() / (*original_max_positions as f64).ln()).sqrt(),
                });
                let schedule = Schedule::LongRope {
                    short: short.clone(),
                    long,
                    original_max: *original_max_positions,
                };
                (short, scaling, schedule)
            }
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => (
                llama3_inv_freq(
                    dim,
                    theta,
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_positions,
                ),
                1.0,
                Schedule::Fixed,
            ),
        };
        Ok(Rotary {
            inv_freq,
            attention_scaling,
            interleaved,
            schedule,
        })
    }

    /// The inverse frequencies the next call uses (after the last update).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The factor cos and sin are multiplied by (YaRN's and LongRoPE's attention factor; 1
    /// otherwise).
    pub fn attention_scaling(&self) -> f64 {
        self.attention_scaling
    }

    /// Updates the frequencies for a call whose positions reach `seq_len - 1`, as transformers'
    /// `dynamic_rope_update` does before each forward pass. Dynamic NTK: when `seq_len` exceeds
    /// the longest length cached (initially `max_position_embeddings`), the frequencies are
    /// recomputed for `seq_len` and it becomes the cached length; when `seq_len` is below
    /// `max_position_embeddings` and the cached length above it, the original frequencies and
    /// cached length come back. LongRoPE: the long frequencies when `seq_len` exceeds
    /// `original_max_position_embeddings`, the short ones otherwise. Other scalings: nothing.
    pub fn update(&mut self, seq_len: usize) {
        match &mut self.schedule {
            Schedule::Fixed => {}
            Schedule::Dynamic {
                dim,
                theta,
                factor,
                original_max,
                original,
                cached,
            } => {
                let cached_before = *cached;
                if seq_len > cached_before {
                    self.inv_freq =
                        dynamic_grown_inv_freq(*dim, *theta, *factor, *original_max, seq_len);
                    *cached = seq_len;
                }
                if seq_len < *original_max && cached_before > *original_max {
                    self.inv_freq = original.clone();
                    *cached = *original_max;
                }
            }
            Schedule::LongRope {
                short,
                long,
                original_max,
            } => {
                let chosen = if seq_len > *original_max { long } else { short };
                self.inv_freq.clone_from(chosen);
            }
        }
    }

    /// The angles of position ids `positions` (`batch` rows of `len`), computed once per
    /// forward pass and shared by every layer's queries and keys; first updates the frequencies
    /// for the largest position (see [`Rotary::update`]).
    pub fn angles(&mut self, positions: &[u32], batch: usize, len: usize) -> Result<RotaryAngles> {
        if let Some(&last) = positions.iter().max() {
            self.update(last as usize + 1);
        }
        let half = self.inv_freq.len();
        let scale = self.attention_scaling as f32;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        Ok(RotaryAngles {
            cos: Tensor::from_vec(cos, (batch, len, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (batch, len, half), &Device::Cpu)?,
            interleaved: self.interleaved,
        })
    }
}

/// `base ** exponent` of two float32 tensors, correctly rounded.
fn pow32(base: f32, exponent: f32) -> f32 {
    (base as f64).powf(exponent as f64) as f32
}

/// transformers' `torch.arange(0, dim, 2).float() / dim`, in float32.
fn exponents(dim: usize) -> impl Iterator<Item = f32> {
    (0..dim / 2).map(move |i| (2 * i) as f32 / dim as f32)
}

/// `1 / base^(2i/dim)` in float32, `base` already a float32.
fn plain_inv_freq(dim: usize, base: f32) -> Vec<f32> {
    exponents(dim).map(|e| 1.0 / pow32(base, e)).collect()
}

fn divide(inv: &[f32], by: f32) -> Vec<f32> {
    inv.iter().map(|f| f / by).collect()
}

/// Dynamic NTK at construction (no sequence yet): transformers computes the base from
/// `max_position_embeddings` in Python floats, which leaves it (nearly) unchanged.
fn dynamic_initial_inv_freq(dim: usize, theta: f64, factor: f64, max_positions: usize) -> Vec<f32> {
    let m = max_positions as f64;
    let base = theta * ((factor * m / m) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
    plain_inv_freq(dim, base as f32)
}

/// Dynamic NTK for a call of `seq_len`: `seq_len` is a tensor there, so the base is computed in
/// float32.
fn dynamic_grown_inv_freq(
    dim: usize,
    theta: f64,
    factor: f64,
    max_positions: usize,
    seq_len: usize,
) -> Vec<f32> {
    let seq = seq_len.max(max_positions) as f32;
    let ratio = (factor as f32 * seq) / max_positions as f32 - (factor - 1.0) as f32;
    let base = theta as f32 * pow32(ratio, (dim as f64 / (dim as f64 - 2.0)) as f32);
    plain_inv_freq(dim, base)
}

/// YaRN's `mscale`: `0.1 * mscale * ln(scale) + 1`, or 1 for `scale <= 1`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    match scale <= 1.0 {
        true => 1.0,
        false => 0.1 * mscale * scale.ln() + 1.0,
    }
}

/// YaRN's blend of interpolated (`/ factor`) and extrapolated frequencies.
fn yarn_inv_freq(
    dim: usize,
    theta: f64,
    factor: f64,
    original_max: usize,
    (beta_fast, beta_slow): (f64, f64),
    truncate: bool,
) -> Vec<f32> {
    // The dimension at which `rotations` full turns fit the original context (Python floats).
    let correction_dim = |rotations: f64| {
        dim as f64 * (original_max as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001;
    }
    let (low32, span) = (low as f32, (high - low) as f32);
    exponents(dim)
        .enumerate()
        .map(|(i, e)| {
            let pos_freq = pow32(theta as f32, e);
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor as f32 * pos_freq);
            let ramp = ((i as f32 - low32) / span).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

/// LongRoPE: `1 / (factor_i * base^(2i/dim))`.
fn longrope_inv_freq(dim: usize, base: f32, factors: &[f64]) -> Vec<f32> {
    exponents(dim)
        .zip(factors)
        .map(|(e, &f)| 1.0 / (f as f32 * pow32(base, e)))
        .collect()
}

/// Llama 3.1: wavelengths longer than `original_max / low_freq_factor` divided by `factor`,
/// shorter than `original_max / high_freq_factor` kept, a smooth blend between.
fn llama3_inv_freq(
    dim: usize,
    theta: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max: usize,
) -> Vec<f32> {
    let old = original_max as f64;
    let low_wavelen = (old / low_freq_factor) as f32;
    let high_wavelen = (old / high_freq_factor) as f32;
    let (factor32, low32) = (factor as f32, low_freq_factor as f32);
    let spread = (high_freq_factor - low_freq_factor) as f32;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    plain_inv_freq(dim, theta as f32)
        .into_iter()
        .map(|inv| {
            let wavelen = two_pi / inv;
            let scaled = if wavelen > low_wavelen {
                inv / factor32
            } else {
                inv
            };
            // transformers: `~(wavelen < high) * ~(wavelen > low)` (the same, wavelen never NaN).
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            if medium {
                let smooth = (old as f32 / wavelen - low32) / spread;
                (1.0 - smooth) * scaled / factor32 + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// Cosines and sines `[B, L, D/2]` of a batch's positions (already multiplied by the
/// attention scaling).
#[derive(Debug, Clone)]
pub struct RotaryAngles {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RotaryAngles {
    /// Rotates `x` `[B, H, L, D]` at these positions (its first dimensions, as many as the
    /// angles cover).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let cos = self.cos.to_dtype(x.dtype())?;
        let sin = self.sin.to_dtype(x.dtype())?;
        let (dim, rotated) = (x.dim(3)?, 2 * self.cos.dim(2)?);
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?;
            Ok(match self.interleaved {
                true => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
                false => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            })
        };
        if rotated == dim {
            return rotate(x);
        }
        let head = rotate(&x.narrow(3, 0, rotated)?)?;
        Ok(Tensor::cat(
            &[head, x.narrow(3, rotated, dim - rotated)?],
            3,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::config::rope::{resolve_rope, RopeConfigs, RopeInput};
    use serde_json::Value;

    fn fixtures() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rope/cases.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= abs + rel * w.abs(),
                "{what}[{i}]: got {g}, transformers {w}\n got {got:?}\nwant {want:?}"
            );
        }
    }

    /// The rope settings of a fixture's config, resolved as `config.json` would be.
    fn configs(config: &Value) -> RopeConfigs {
        let count = |k: &str| config.get(k).and_then(Value::as_u64).map(|v| v as usize);
        resolve_rope(&RopeInput {
            rope_parameters: config.get("rope_parameters"),
            rope_scaling: config.get("rope_scaling"),
            rope_theta: config.get("rope_theta").and_then(Value::as_f64),
            rope_local_base_freq: config.get("rope_local_base_freq").and_then(Value::as_f64),
            max_position_embeddings: count("max_position_embeddings"),
            original_max_position_embeddings: count("original_max_position_embeddings"),
            default_theta: 10_000.0,
        })
        .unwrap()
    }

    #[test]
    fn rope_matches_transformers_fixtures() {
        let fixtures = fixtures();
        assert!(fixtures["transformers"].as_str().unwrap().starts_with("5."));
        let cases = fixtures["cases"].as_array().unwrap();
        assert!(cases.len() >= 40);
        let mut steps_checked = 0;
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let dim = case["rotary_dim"].as_u64().unwrap() as usize;
            let resolved = configs(&case["config"]);
            for (layer_type, steps) in case["results"].as_object().unwrap() {
                let config = match layer_type.as_str() {
                    "full_attention" => resolved.full.clone(),
                    _ => resolved.sliding.clone().unwrap(),
                };
                let mut rotary = Rotary::scaled(dim, &config, false).unwrap();
                for step in steps.as_array().unwrap() {
                    let what = format!("{name} {layer_type} seq_len {}", step["seq_len"]);
                    let angles = match step["seq_len"].as_u64() {
                        None => None,
                        Some(n) => {
                            let positions: Vec<u32> = (0..n as u32).collect();
                            Some(rotary.angles(&positions, 1, n as usize).unwrap())
                        }
                    };
                    let inv: Vec<f64> = rotary.inv_freq().iter().map(|&f| f as f64).collect();
                    assert_close(
                        &format!("{what} inv_freq"),
                        &inv,
                        &floats(&step["inv_freq"]),
                        1e-5,
                        0.0,
                    );
                    let want = step["attention_scaling"].as_f64().unwrap();
                    let got = rotary.attention_scaling();
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs(),
                        "{what}: scaling {got} vs {want}"
                    );
                    if let Some(angles) = angles {
                        let n = step["seq_len"].as_u64().unwrap() as usize;
                        // Angles of up to a few hundred radians: a float32 rounding of the
                        // frequency moves them by ~1e-5.
                        let tol = 1e-5 + n as f64 * 2e-7;
                        for (part, tensor) in [("cos", &angles.cos), ("sin", &angles.sin)] {
                            let rows = tensor.to_vec3::<f32>().unwrap();
                            let last: Vec<f64> = rows[0][n - 1].iter().map(|&v| v as f64).collect();
                            let want = floats(&step[format!("{part}_last").as_str()]);
                            assert_close(&format!("{what} {part}"), &last, &want, 0.0, tol);
                        }
                    }
                    steps_checked += 1;
                }
            }
        }
        assert!(steps_checked > 100, "{steps_checked}");
    }

    #[test]
    fn rope_dynamic_state_sequence() {
        let config = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::Dynamic {
                factor: 2.0,
                original_max_positions: 64,
            },
        };
        let mut rotary = Rotary::scaled(8, &config, false).unwrap();
        let original = rotary.inv_freq().to_vec();
        assert_eq!(original, Rotary::new(8, 10_000.0).inv_freq());
        rotary.update(64);
        assert_eq!(rotary.inv_freq(), original);
        rotary.update(100);
        let grown = rotary.inv_freq().to_vec();
        assert!(grown[1] < original[1]);
        rotary.update(80); // below the cache, above the original: kept
        assert_eq!(rotary.inv_freq(), grown);
        rotary.update(63); // below the original after growing: reset
        assert_eq!(rotary.inv_freq(), original);
        rotary.update(64);
        assert_eq!(rotary.inv_freq(), original);
        rotary.update(100);
        assert_eq!(rotary.inv_freq(), grown);
    }

    #[test]
    fn rope_longrope_switches_by_call_length() {
        let config = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0],
                long_factor: vec![4.0, 8.0],
                original_max_positions: 16,
                attention_factor: None,
                factor: 4.0,
            },
        };
        let mut rotary = Rotary::scaled(4, &config, false).unwrap();
        let short = rotary.inv_freq().to_vec();
        assert_eq!(short, [1.0, 0.005]);
        let expected = (1.0 + 4f64.ln() / 16f64.ln()).sqrt();
        assert!((rotary.attention_scaling() - expected).abs() < 1e-12);
        let positions: Vec<u32> = (0..17).collect();
        rotary.angles(&positions, 1, 17).unwrap();
        assert_eq!(rotary.inv_freq(), [0.25, 0.00125]);
        rotary.angles(&positions[..16], 1, 16).unwrap();
        assert_eq!(rotary.inv_freq(), short);
        // Decoding one token at position 16 (seq_len 17) uses the long factors again.
        rotary.angles(&[16], 1, 1).unwrap();
        assert_eq!(rotary.inv_freq(), [0.25, 0.00125]);
    }

    #[test]
    fn rope_scaled_refuses_bad_dims() {
        let config = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0; 3],
                long_factor: vec![1.0; 4],
                original_max_positions: 16,
                attention_factor: None,
                factor: 1.0,
            },
        };
        let err = Rotary::scaled(8, &config, false).unwrap_err().to_string();
        assert!(err.contains("short_factor"), "{err}");
        assert!(Rotary::scaled(7, &RopeConfig::plain(1e4), false).is_err());
        assert!(Rotary::scaled(0, &RopeConfig::plain(1e4), false).is_err());
    }

    #[test]
    fn rope_attention_scaling_multiplies_the_rotation() {
        let config = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_max_positions: 64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: Some(2.0),
                truncate: true,
            },
        };
        let mut rotary = Rotary::scaled(4, &config, false).unwrap();
        let x = Tensor::ones((1, 1, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        // At position 0 the rotation is the identity, times the attention factor.
        let y = rotary.angles(&[0], 1, 1).unwrap().apply(&x).unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, [2.0; 4]);
    }
}
