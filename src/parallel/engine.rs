//! Building one rank's shard of a model: resolve each tensor name in the checkpoint, look up its
//! role in the policy, check its shape against the configuration, and read only the rank's slice.

use candle_core::{DType, Tensor};

use crate::checkpoint::WeightSource;
use crate::error::{Error, Result};
use crate::models::layers::LinearWeight;
use crate::parallel::meter::LoadMeter;
use crate::parallel::slicing::Plan;
use crate::policy::{Policy, Role};
use crate::WeightDType;

/// Bytes of weights a rank holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WeightBytes {
    /// Bytes of tensors split among ranks (this rank's slices only).
    pub sliced: u64,
    /// Bytes of tensors every rank holds whole.
    pub replicated: u64,
    /// Bytes of the whole experts this rank holds (expert parallelism).
    #[serde(default)]
    pub experts: u64,
    /// Of all the above, the bytes of routed experts (their slices or whole experts): a decode
    /// step reads only the experts its tokens are routed to.
    #[serde(default)]
    pub routed: u64,
}

impl WeightBytes {
    /// Adds `bytes` of a tensor with `role` to the sliced, the replicated or the experts' total.
    pub fn add(&mut self, role: &Role, bytes: u64) {
        if role.holds_routed_experts() {
            self.routed += bytes;
        }
        match role {
            Role::Replicate | Role::Router => self.replicated += bytes,
            Role::Expert => self.experts += bytes,
            _ => self.sliced += bytes,
        }
    }

    /// Every kind together.
    pub fn total(&self) -> u64 {
        self.sliced + self.replicated + self.experts
    }
}

/// One contiguous block of a stored 2-D (or 1-D) tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl Block {
    /// The block that takes `range` along `dim` of a `rows × cols` tensor and all of the other
    /// dimension.
    fn along(dim: usize, range: std::ops::Range<usize>, rows: usize, cols: usize) -> Self {
        if dim == 0 {
            Block {
                rows: range,
                cols: 0..cols,
            }
        } else {
            Block {
                rows: 0..rows,
                cols: range,
            }
        }
    }
}

/// How a rank's slice of one tensor is assembled from stored blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePlan {
    blocks: Vec<Block>,
    /// Blocks are concatenated along this stored dimension.
    concat_dim: usize,
    /// The slice is transposed after assembly (stored `[in, out]`).
    transpose: bool,
    /// Shape of the slice as the model receives it.
    pub shape: Vec<usize>,
}

/// Plans which stored blocks make up `rank`'s slice of a tensor of `stored_shape` with `role`.
pub fn plan_slice(
    name: &str,
    role: &Role,
    stored_shape: &[usize],
    plan: &Plan,
    rank: usize,
) -> Result<SlicePlan> {
    let (rows, cols, two_d) = match stored_shape {
        [c] => (1, *c, false),
        [r, c] => (*r, *c, true),
        _ if !role.is_sliced() => {
            return Ok(SlicePlan {
                blocks: vec![],
                concat_dim: 0,
                transpose: false,
                shape: stored_shape.to_vec(),
            })
        }
        other => {
            return Err(Error::InvalidInput(format!(
                "tensor `{name}` has {} dimensions and cannot be split",
                other.len()
            )))
        }
    };
    let whole = Block {
        rows: 0..rows,
        cols: 0..cols,
    };
    if *role == Role::Expert && !holds_expert_of(name, plan, rank)? {
        // Another rank's expert: nothing of it here.
        return Ok(SlicePlan {
            blocks: vec![],
            concat_dim: 0,
            transpose: false,
            shape: vec![0],
        });
    }
    // For a 1-D tensor the split dimension is its only one: model it as a row vector.
    let (blocks, concat_dim, transpose) = match role {
        Role::Replicate | Role::Router | Role::Expert => (vec![whole], 0, false),
        Role::Column { parts, transposed } => {
            let split_dim = if *transposed || !two_d { 1 } else { 0 };
            let stored_len = if split_dim == 0 { rows } else { cols };
            let total: usize = parts.iter().map(|p| plan.split(*p).total_elements()).sum();
            if total != stored_len {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    actual: stored_shape.to_vec(),
                    expected: expected_shape(stored_shape, split_dim, two_d, total),
                });
            }
            let mut offset = 0;
            let mut blocks = Vec::new();
            for part in parts {
                let split = plan.split(*part);
                let range = split.elements(rank);
                let range = offset + range.start..offset + range.end;
                offset += split.total_elements();
                blocks.push(Block::along(split_dim, range, rows, cols));
            }
            (blocks, split_dim, *transposed)
        }
        Role::PerHead { parts } => {
            let split = plan.split(crate::policy::Partition::Heads);
            let split_dim = if two_d { 0 } else { 1 };
            let stored_len = if two_d { rows } else { cols };
            let total = split.total_elements() * parts;
            if total != stored_len {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    actual: stored_shape.to_vec(),
                    expected: expected_shape(stored_shape, split_dim, two_d, total),
                });
            }
            let heads = split.elements(rank);
            let range = heads.start * parts..heads.end * parts;
            (
                vec![Block::along(split_dim, range, rows, cols)],
                split_dim,
                false,
            )
        }
        Role::Grouped => {
            let (split_dim, stored_len) = if two_d { (0, rows) } else { (1, cols) };
            let ranges = grouped_ranges(plan, rank);
            let total = plan.heads.total_elements() + 2 * plan.kv_heads.total_elements();
            if total != stored_len || ranges.is_empty() {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    actual: stored_shape.to_vec(),
                    expected: expected_shape(stored_shape, split_dim, two_d, total),
                });
            }
            let blocks = ranges
                .into_iter()
                .map(|range| Block::along(split_dim, range, rows, cols))
                .collect();
            (blocks, split_dim, false)
        }
        Role::Row {
            partition,
            transposed,
        } => {
            let split = plan.split(*partition);
            let split_dim = if *transposed { 0 } else { 1 };
            let stored_len = if split_dim == 0 { rows } else { cols };
            if !two_d {
                return Err(Error::InvalidInput(format!(
                    "tensor `{name}` has shape {stored_shape:?}: a row split needs a 2-D weight"
                )));
            }
            if split.total_elements() != stored_len {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    actual: stored_shape.to_vec(),
                    expected: expected_shape(stored_shape, split_dim, true, split.total_elements()),
                });
            }
            let block = Block::along(split_dim, split.elements(rank), rows, cols);
            (vec![block], split_dim, *transposed)
        }
    };
    let stored_rows: usize = if concat_dim == 0 {
        blocks.iter().map(|b| b.rows.len()).sum()
    } else {
        rows
    };
    let stored_cols: usize = if concat_dim == 1 {
        blocks.iter().map(|b| b.cols.len()).sum()
    } else {
        cols
    };
    let shape = match (two_d, transpose) {
        (false, _) => vec![stored_cols],
        (true, false) => vec![stored_rows, stored_cols],
        (true, true) => vec![stored_cols, stored_rows],
    };
    Ok(SlicePlan {
        blocks,
        concat_dim,
        transpose,
        shape,
    })
}

/// Whether `rank` owns the expert tensor `name` ([`Role::Expert`]) belongs to; an error when
/// its number names no expert of the plan.
fn holds_expert_of(name: &str, plan: &Plan, rank: usize) -> Result<bool> {
    let experts = plan.experts.total_units();
    match crate::policy::expert_number(name) {
        Some(expert) if expert < experts => Ok(plan.experts.units(rank).contains(&expert)),
        Some(expert) => Err(Error::InvalidInput(format!(
            "tensor `{name}` belongs to expert {expert}, but the model has {experts} experts"
        ))),
        None => Err(Error::InvalidInput(format!(
            "tensor `{name}` is held by expert, but its name has no expert number"
        ))),
    }
}

/// The stored element ranges of `rank`'s rows of a q/k/v projection fused by key/value group
/// (each group: its query heads, its key head, its value head), in the order queries, keys,
/// values; empty when the plan's heads do not divide into groups.
fn grouped_ranges(plan: &Plan, rank: usize) -> Vec<std::ops::Range<usize>> {
    let (heads, kv_heads) = (plan.heads.units(rank), plan.kv_heads.units(rank));
    let (all_q, all_kv) = (plan.heads.total_elements(), plan.kv_heads.total_elements());
    let all_heads = plan.heads.total_units();
    let all_groups = plan.kv_heads.total_units();
    if all_groups == 0
        || !all_heads.is_multiple_of(all_groups)
        || !all_q.is_multiple_of(all_heads.max(1))
    {
        return Vec::new();
    }
    let dim = all_q / all_heads;
    let group = all_heads / all_groups;
    if all_kv != all_groups * dim {
        return Vec::new();
    }
    let row_of = |g: usize, slot: usize| (g * (group + 2) + slot) * dim;
    let queries = heads.map(|h| {
        let start = row_of(h / group, h % group);
        start..start + dim
    });
    let keys = kv_heads
        .clone()
        .map(|g| row_of(g, group)..row_of(g, group) + dim);
    let values = kv_heads.map(|g| row_of(g, group + 1)..row_of(g, group + 1) + dim);
    queries.chain(keys).chain(values).collect()
}

fn expected_shape(stored: &[usize], split_dim: usize, two_d: bool, total: usize) -> Vec<usize> {
    let mut shape = stored.to_vec();
    let dim = if two_d { split_dim } else { 0 };
    shape[dim] = total;
    shape
}

/// Reads one rank's slices from a weight source, according to a policy, into candle tensors.
pub struct ShardLoader<'a> {
    source: &'a dyn WeightSource,
    policy: &'a Policy,
    plan: &'a Plan,
    rank: usize,
    dtype: DType,
    keep_quantized: bool,
    bytes: WeightBytes,
    /// Slices read so far, by stored name: a tensor that several blocks share (ALBERT) is read
    /// and held once.
    read: std::collections::HashMap<String, Tensor>,
    /// Where the tensors read are counted and reported, if anywhere.
    meter: Option<LoadMeter<'a>>,
}

impl<'a> ShardLoader<'a> {
    /// A loader for `rank` that holds weights in `dtype`: every tensor converted to its float
    /// type, except that [`WeightDType::Quantized`] keeps the quantized blocks of linear weights
    /// that the source stores quantized (see [`ShardLoader::try_load_linear`]).
    pub fn new(
        source: &'a dyn WeightSource,
        policy: &'a Policy,
        plan: &'a Plan,
        rank: usize,
        dtype: WeightDType,
    ) -> Self {
        ShardLoader {
            source,
            policy,
            plan,
            rank,
            dtype: dtype.into(),
            keep_quantized: dtype == WeightDType::Quantized,
            bytes: WeightBytes::default(),
            read: std::collections::HashMap::new(),
            meter: None,
        }
    }

    /// Counts each tensor read on `meter`, which reports how far the load has got.
    pub fn metered(mut self, meter: LoadMeter<'a>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Tells the meter, if any, that the model has read all it needs.
    pub fn finish(&mut self) -> Result<()> {
        match self.meter.as_mut() {
            Some(meter) => meter.finish(),
            None => Ok(()),
        }
    }

    /// Counts stored tensor `full` of `shape` on the meter, if any.
    fn count_read(&mut self, full: &str, shape: &[usize]) -> Result<()> {
        match self.meter.as_mut() {
            Some(meter) => meter.read(full, shape),
            None => Ok(()),
        }
    }

    /// The split arithmetic this loader follows.
    pub fn plan(&self) -> &Plan {
        self.plan
    }

    /// This loader's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Bytes loaded so far.
    pub fn bytes(&self) -> WeightBytes {
        self.bytes
    }

    /// Finds `name` in the source, as given or behind one of the policy's prefixes, with its shape.
    fn resolve(&self, name: &str) -> Option<(String, Vec<usize>)> {
        let name = self.policy.checkpoint_name(name);
        std::iter::once("")
            .chain(self.policy.prefixes.iter().map(String::as_str))
            .map(|prefix| format!("{prefix}{name}"))
            .find_map(|full| self.source.shape(&full).map(|shape| (full, shape)))
    }

    /// Loads this rank's slice of `name`, whose stored shape must be `stored_shape`.
    pub fn load(&mut self, name: &str, stored_shape: &[usize]) -> Result<Tensor> {
        self.try_load(name, stored_shape)?
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                dir: self.source.location().to_path_buf(),
            })
    }

    /// Loads this rank's slice of the linear (or embedding) weight `name`, `[out, in]` as
    /// stored: quantized blocks where the loader keeps them and the slice falls on their
    /// boundaries, a tensor in the loader's dtype otherwise.
    pub fn load_linear(&mut self, name: &str, stored_shape: &[usize]) -> Result<LinearWeight> {
        self.try_load_linear(name, stored_shape)?
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                dir: self.source.location().to_path_buf(),
            })
    }

    /// Like [`ShardLoader::load_linear`], but `None` when the source lacks the tensor.
    pub fn try_load_linear(
        &mut self,
        name: &str,
        stored_shape: &[usize],
    ) -> Result<Option<LinearWeight>> {
        let Some((full, role, slice)) = self.slice_of(name, stored_shape)? else {
            return Ok(None);
        };
        if let Some(block) = self.quantized_block(&slice) {
            let quantized =
                self.source
                    .read_quantized(&full, block.rows.clone(), block.cols.clone())?;
            if let Some(matrix) = quantized {
                self.bytes.add(&role, matrix.bytes() as u64);
                self.count_read(&full, stored_shape)?;
                return Ok(Some(matrix.into()));
            }
        }
        Ok(Some(
            self.read_slice(&full, &role, &slice, stored_shape)?.into(),
        ))
    }

    /// The stored name, role and slice plan of `name` for this rank, after checking its shape;
    /// `None` when the source lacks it.
    fn slice_of(
        &self,
        name: &str,
        stored_shape: &[usize],
    ) -> Result<Option<(String, Role, SlicePlan)>> {
        let Some((full, shape)) = self.resolve(name) else {
            return Ok(None);
        };
        if shape != stored_shape {
            return Err(Error::TensorShape {
                name: full,
                actual: shape,
                expected: stored_shape.to_vec(),
            });
        }
        let role = self.policy.role_of(&full).cloned().ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "policy `{}` has no rule for tensor `{full}`",
                self.policy.name
            ))
        })?;
        let slice = plan_slice(&full, &role, &shape, self.plan, self.rank)?;
        if slice.shape == [0] {
            return Err(Error::InvalidInput(format!(
                "rank {} does not hold `{full}`: it belongs to another rank's expert",
                self.rank
            )));
        }
        Ok(Some((full, role, slice)))
    }

    /// Whether this rank holds (its slice of) tensor `name`: false only for a tensor of an
    /// expert that another rank holds whole ([`Role::Expert`]), or one the source lacks.
    pub fn holds(&self, name: &str) -> Result<bool> {
        let Some((full, _)) = self.resolve(name) else {
            return Ok(false);
        };
        match self.policy.role_of(&full) {
            Some(Role::Expert) => holds_expert_of(&full, self.plan, self.rank),
            _ => Ok(true),
        }
    }

    /// The one stored block of `slice` that a linear weight may keep in the source's quantized
    /// blocks: only where the loader keeps them, and the slice is a single block read as stored
    /// (not assembled from parts, not transposed).
    fn quantized_block<'s>(&self, slice: &'s SlicePlan) -> Option<&'s Block> {
        match (
            slice.blocks.as_slice(),
            slice.transpose,
            self.keep_quantized,
        ) {
            ([block], false, true) => Some(block),
            _ => None,
        }
    }

    /// The float dtype a tensor of `role` is held in: the loader's, f32 for a router.
    fn dtype_of(&self, role: &Role) -> DType {
        match role {
            Role::Router => DType::F32,
            _ => self.dtype,
        }
    }

    /// Bytes of `elements` weights of `role` converted to their float dtype.
    fn float_bytes(&self, role: &Role, elements: usize) -> u64 {
        (elements * self.dtype_of(role).size_in_bytes()) as u64
    }

    /// This rank's slice of stored tensor `full` (of `shape`, with `role`) and the bytes it
    /// would hold of it, from the headers alone: the rules of [`ShardLoader::try_load_linear`]
    /// for a 2-D tensor (which every model a quantized format can hold loads as a linear
    /// weight), those of [`ShardLoader::try_load`] for any other.
    pub fn forecast(&self, full: &str, role: &Role, shape: &[usize]) -> Result<(SlicePlan, u64)> {
        let slice = plan_slice(full, role, shape, self.plan, self.rank)?;
        let quantized = match self.quantized_block(&slice) {
            Some(block) if shape.len() == 2 => {
                self.source
                    .quantized_bytes(full, block.rows.clone(), block.cols.clone())?
            }
            _ => None,
        };
        let bytes = quantized
            .unwrap_or_else(|| self.float_bytes(role, slice.shape.iter().product::<usize>()));
        Ok((slice, bytes))
    }

    /// Like [`ShardLoader::load`], but `None` when the source lacks the tensor.
    pub fn try_load(&mut self, name: &str, stored_shape: &[usize]) -> Result<Option<Tensor>> {
        let Some((full, role, slice)) = self.slice_of(name, stored_shape)? else {
            return Ok(None);
        };
        Ok(Some(self.read_slice(&full, &role, &slice, stored_shape)?))
    }

    /// Reads `slice` of stored tensor `full` (of `shape`) into the dtype of `role` and counts
    /// it.
    fn read_slice(
        &mut self,
        full: &str,
        role: &Role,
        slice: &SlicePlan,
        shape: &[usize],
    ) -> Result<Tensor> {
        if let Some(tensor) = self.read.get(full) {
            return Ok(tensor.clone());
        }
        let tensor = if slice.blocks.is_empty() {
            self.source.read(full, None)?
        } else {
            let pieces = slice
                .blocks
                .iter()
                .map(|block| {
                    self.source
                        .read(full, Some((block.rows.clone(), block.cols.clone())))
                })
                .collect::<Result<Vec<_>>>()?;
            let dim = if shape.len() == 2 {
                slice.concat_dim
            } else {
                0
            };
            let joined = Tensor::cat(&pieces, dim)?;
            if slice.transpose {
                joined.t()?.contiguous()?
            } else {
                joined
            }
        };
        let tensor = tensor.to_dtype(self.dtype_of(role))?;
        self.bytes
            .add(role, self.float_bytes(role, tensor.elem_count()));
        self.read.insert(full.to_string(), tensor.clone());
        self.count_read(full, shape)?;
        Ok(tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Partition;

    fn plan() -> Plan {
        Plan {
            world_size: 2,
            heads: crate::parallel::Split::from_counts(2, vec![2, 1]),
            kv_heads: crate::parallel::Split::from_counts(2, vec![2, 1]),
            intermediate: crate::parallel::Split::even(5, 1, 2),
            expert_intermediate: crate::parallel::Split::even(5, 1, 2),
            experts: crate::parallel::Split::even(3, 1, 2),
            shared_expert_intermediate: crate::parallel::Split::even(5, 1, 2),
            vocab: crate::parallel::Split::even(7, 1, 2),
        }
    }

    #[test]
    fn a_whole_expert_is_held_by_its_owner_only() {
        // Three experts over two ranks: 0 and 1 on rank 0, 2 on rank 1.
        let name = |e: usize| format!("layers.1.mlp.experts.{e}.up_proj.weight");
        let held = |e: usize, rank: usize| {
            plan_slice(&name(e), &Role::Expert, &[4, 6], &plan(), rank)
                .unwrap()
                .shape
        };
        assert_eq!((held(1, 0), held(1, 1)), (vec![4, 6], vec![0]));
        assert_eq!((held(2, 0), held(2, 1)), (vec![0], vec![4, 6]));
        let beyond = plan_slice(&name(3), &Role::Expert, &[4, 6], &plan(), 0).unwrap_err();
        assert!(
            beyond.to_string().contains("the model has 3 experts"),
            "{beyond}"
        );
        let unnumbered = plan_slice("mlp.up.weight", &Role::Expert, &[4, 6], &plan(), 0);
        assert!(unnumbered
            .unwrap_err()
            .to_string()
            .contains("no expert number"));
    }

    #[test]
    fn fused_transposed_column_takes_each_part_of_the_rank() {
        let role = Role::Column {
            parts: vec![Partition::Heads; 3],
            transposed: true,
        };
        // stored [in=4, out=3*6]; rank 1 owns elements 4..6 of each part of 6.
        let s = plan_slice("c_attn", &role, &[4, 18], &plan(), 1).unwrap();
        let cols: Vec<_> = s.blocks.iter().map(|b| b.cols.clone()).collect();
        assert_eq!(cols, vec![4..6, 10..12, 16..18]);
        assert_eq!(s.shape, vec![6, 4]);
        assert!(s.transpose);
    }

    #[test]
    fn a_per_head_fused_projection_gives_each_rank_its_heads_rows() {
        // Heads split 2 + 1 with 2 elements each; 3 blocks per head: rank 1 owns head 2's rows.
        let role = Role::PerHead { parts: 3 };
        let s = plan_slice("query_key_value", &role, &[18, 4], &plan(), 1).unwrap();
        assert_eq!(
            s.blocks,
            vec![Block {
                rows: 12..18,
                cols: 0..4
            }]
        );
        assert_eq!(s.shape, vec![6, 4]);
        let bias = plan_slice("query_key_value.bias", &role, &[18], &plan(), 0).unwrap();
        assert_eq!(bias.shape, vec![12]);
        assert!(plan_slice("qkv", &role, &[17, 4], &plan(), 0).is_err());
    }

    #[test]
    fn a_projection_fused_by_group_gives_each_rank_its_queries_then_keys_then_values() {
        // 4 query heads in 2 groups, heads 2 elements wide: stored rows per group are
        // q, q, k, v (8 rows). Three ranks: heads 2 + 1 + 1; rank 1 holds head 2 (group 1).
        let plan = Plan {
            world_size: 3,
            heads: crate::parallel::Split::from_counts(2, vec![2, 1, 1]),
            kv_heads: crate::parallel::Split::covering(
                &crate::parallel::Split::from_counts(2, vec![2, 1, 1]),
                2,
                2,
                2,
            ),
            intermediate: crate::parallel::Split::even(5, 1, 3),
            expert_intermediate: crate::parallel::Split::even(5, 1, 3),
            experts: crate::parallel::Split::even(0, 1, 3),
            shared_expert_intermediate: crate::parallel::Split::even(5, 1, 3),
            vocab: crate::parallel::Split::even(7, 1, 3),
        };
        let s = plan_slice("qkv", &Role::Grouped, &[16, 4], &plan, 1).unwrap();
        let rows: Vec<_> = s.blocks.iter().map(|b| b.rows.clone()).collect();
        assert_eq!(rows, vec![8..10, 12..14, 14..16]);
        let s = plan_slice("qkv", &Role::Grouped, &[16, 4], &plan, 0).unwrap();
        let rows: Vec<_> = s.blocks.iter().map(|b| b.rows.clone()).collect();
        assert_eq!(rows, vec![0..2, 2..4, 4..6, 6..8]);
    }

    #[test]
    fn row_split_takes_input_columns() {
        let role = Role::Row {
            partition: Partition::Intermediate,
            transposed: false,
        };
        let s = plan_slice("down", &role, &[8, 5], &plan(), 0).unwrap();
        assert_eq!(
            s.blocks,
            vec![Block {
                rows: 0..8,
                cols: 0..3
            }]
        );
        assert_eq!(s.shape, vec![8, 3]);
        // A policy file may put a row split on a bias (found by the policy_file fuzz seeds).
        let err = plan_slice("down.bias", &role, &[5], &plan(), 0).unwrap_err();
        assert!(err.to_string().contains("`down.bias`"), "{err}");
        assert!(err.to_string().contains("2-D"), "{err}");
    }

    #[test]
    fn bias_of_a_fused_column_is_split_per_part() {
        let s = plan_slice(
            "b",
            &Role::column_parts(vec![Partition::Heads; 3]),
            &[18],
            &plan(),
            0,
        )
        .unwrap();
        let cols: Vec<_> = s.blocks.iter().map(|b| b.cols.clone()).collect();
        assert_eq!(cols, vec![0..4, 6..10, 12..16]);
        assert_eq!(s.shape, vec![12]);
    }

    #[test]
    fn a_shape_that_disagrees_with_the_config_is_named() {
        let err = plan_slice(
            "embed",
            &Role::column(Partition::Vocab),
            &[9, 4],
            &plan(),
            0,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `embed` has shape [9, 4], but the configuration implies [7, 4]"
        );
    }
}
