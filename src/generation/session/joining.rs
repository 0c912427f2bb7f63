//! Sequences that joined a session and are still being prefilled. Sequences that join together
//! are prefilled as one group with caches of its own (their prompts padded on the left to one
//! width); a sequence whose prompt starts with blocks the prefix cache holds gets a group of its
//! own, seeded with them. Each step prefills at most a budget of prompt tokens (the groups with
//! the least left first), all in one forward pass together with the running batch's decode
//! step, so that a long prompt is prefilled in chunks and the running sequences keep
//! streaming; a group joins the running batch once its whole prompt is in its caches. (The
//! budget comes from [`pacing`](super::pacing).)

use candle_core::Tensor;

use super::{Row, SequenceRequest};
use crate::comm::Communicator;
use crate::error::Result;
use crate::generation::constraint::Grammars;
use crate::generation::prefix_cache::PrefixCache;
use crate::generation::{caches_of, CachedPass};
use crate::models::attention::LayerCaches;
use crate::models::{Batch, ShardedModel};

/// Sequences prefilled together.
pub(super) struct Group {
    /// The sequences, in the order of their rows.
    pub rows: Vec<Row>,
    /// Each prompt with `padding` pad ids in front, all of one width.
    ids: Vec<Vec<u32>>,
    padding: Vec<usize>,
    /// Columns already in the caches.
    done: usize,
    /// The caches of the columns done.
    pub caches: LayerCaches,
}

impl Group {
    /// A group of `rows` with nothing cached.
    fn new(rows: Vec<Row>) -> Self {
        let width = rows.iter().map(|r| r.prompt_len).max().unwrap_or(0);
        let padding: Vec<usize> = rows.iter().map(|r| width - r.prompt_len).collect();
        Group {
            ids: rows
                .iter()
                .zip(&padding)
                .map(|(r, &pad)| [vec![0; pad], r.ids.clone()].concat())
                .collect(),
            padding,
            rows,
            done: 0,
            caches: LayerCaches::default(),
        }
    }

    /// A group of one row whose first `cached` positions are in `caches` already.
    fn seeded(row: Row, caches: LayerCaches, cached: usize) -> Self {
        Group {
            ids: vec![row.ids.clone()],
            padding: vec![0],
            rows: vec![row],
            done: cached,
            caches,
        }
    }

    /// Columns of every row, padding included.
    pub fn width(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }

    /// Row `row`'s left padding.
    pub fn padding(&self, row: usize) -> usize {
        self.padding[row]
    }

    /// Tokens left to prefill, padding included.
    fn left(&self) -> usize {
        self.rows.len() * (self.width() - self.done)
    }

    /// The input of a pass that prefills the next `columns` columns in the group's own
    /// caches (empty caches of the model's `layers` for a group that starts).
    fn next_input(&mut self, columns: usize, layers: usize) -> CachedPass {
        if self.done == 0 {
            self.caches = LayerCaches::new(layers);
        }
        CachedPass::prefill(&self.ids, &self.padding, self.done..self.done + columns)
    }

    /// Records that a pass put the next `columns` columns in the caches and gave `logits`;
    /// once the last column is done, returns every row's logits `[rows, vocab]`.
    fn advanced(&mut self, columns: usize, logits: Tensor) -> Result<Option<Tensor>> {
        self.done += columns;
        if self.done < self.width() {
            return Ok(None);
        }
        let vocab = logits.dim(2)?;
        Ok(Some(logits.reshape((self.rows.len(), vocab))?))
    }

    /// Drops the rows of sequences `ids`, and the columns that only they needed; returns the
    /// rows dropped.
    fn cancel(&mut self, ids: &[u32]) -> Result<Vec<Row>> {
        let kept: Vec<usize> = (0..self.rows.len())
            .filter(|&r| !ids.contains(&self.rows[r].id))
            .collect();
        if kept.len() == self.rows.len() {
            return Ok(Vec::new());
        }
        let width = kept
            .iter()
            .map(|&r| self.rows[r].prompt_len)
            .max()
            .unwrap_or(0);
        let dropped_columns = self.width() - width;
        let done = self.done.saturating_sub(dropped_columns);
        if !kept.is_empty() && self.done > 0 {
            self.caches.retain(&kept, done)?;
        }
        self.done = done;
        let mut cancelled = Vec::new();
        let (mut rows, mut ids, mut padding) = (Vec::new(), Vec::new(), Vec::new());
        let old = self
            .rows
            .drain(..)
            .zip(self.ids.drain(..))
            .zip(&self.padding);
        for (index, ((row, row_ids), &pad)) in old.enumerate() {
            match kept.contains(&index) {
                true => {
                    ids.push(row_ids[dropped_columns..].to_vec());
                    padding.push(pad - dropped_columns);
                    rows.push(row);
                }
                false => cancelled.push(row),
            }
        }
        (self.rows, self.ids, self.padding) = (rows, ids, padding);
        Ok(cancelled)
    }
}

/// The groups being prefilled.
#[derive(Default)]
pub(super) struct Joining {
    groups: Vec<Group>,
}

impl Joining {
    /// Whether nothing is being prefilled.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether sequence `id` is being prefilled.
    pub fn contains(&self, id: u32) -> bool {
        self.groups
            .iter()
            .any(|g| g.rows.iter().any(|r| r.id == id))
    }

    /// Adds `sequences` (on rank 0, which chooses their tokens, with the `grammars` of their
    /// constraints): those whose prompt starts with blocks of `prefix` in groups of their own,
    /// seeded with them, the others in one group. Returns the prompt tokens seeded.
    pub fn add(
        &mut self,
        sequences: &[SequenceRequest],
        prefix: &mut PrefixCache,
        grammars: Option<&Grammars>,
    ) -> Result<usize> {
        let mut fresh = Vec::new();
        let mut seeded = 0;
        for sequence in sequences {
            let row = Row::new(sequence, grammars);
            match prefix.seed(&sequence.prompt)? {
                Some((caches, cached)) => {
                    seeded += cached;
                    self.groups.push(Group::seeded(row, caches, cached));
                }
                None => fresh.push(row),
            }
        }
        if !fresh.is_empty() {
            self.groups.push(Group::new(fresh));
        }
        Ok(seeded)
    }

    /// Drops the sequences `ids` wherever they are being prefilled; returns their rows.
    pub fn cancel(&mut self, ids: &[u32]) -> Result<Vec<Row>> {
        let mut cancelled = Vec::new();
        for group in &mut self.groups {
            cancelled.extend(group.cancel(ids)?);
        }
        self.groups.retain(|g| !g.rows.is_empty());
        Ok(cancelled)
    }

    /// Prefills up to `budget` prompt tokens (padding included), the groups with the least
    /// left first, each by at least one column, in one pass of the model together with the
    /// running batch's decode step `decode` when given.
    pub fn advance(
        &mut self,
        model: &mut dyn ShardedModel,
        comm: &dyn Communicator,
        budget: usize,
        decode: Option<&Batch>,
    ) -> Result<Advanced> {
        self.groups.sort_by_key(Group::left);
        let mut plan = Vec::new();
        let mut tokens = 0;
        for group in &self.groups {
            if tokens >= budget {
                break;
            }
            let (rows, columns_left) = (group.rows.len(), group.width() - group.done);
            let columns = ((budget - tokens) / rows).clamp(1, columns_left);
            tokens += rows * columns;
            plan.push(columns);
        }
        let layers = caches_of(model)?.layer_count();
        let planned = self.groups.iter_mut().zip(&plan);
        let inputs: Vec<CachedPass> = planned.map(|(g, &c)| g.next_input(c, layers)).collect();
        let batches: Vec<Batch> = decode
            .copied()
            .into_iter()
            .chain(inputs.iter().map(CachedPass::batch))
            .collect();
        let caches = decode
            .map(|_| None)
            .into_iter()
            .chain(
                self.groups
                    .iter_mut()
                    .take(plan.len())
                    .map(|g| Some(&mut g.caches)),
            )
            .collect();
        let mut outputs = model.forward_segments(&batches, caches, comm)?.into_iter();
        let decoded = decode.and_then(|_| outputs.next());
        let mut complete = Vec::new();
        let mut index = 0;
        for (&columns, logits) in plan.iter().zip(outputs) {
            match self.groups[index].advanced(columns, logits)? {
                Some(logits) => complete.push((self.groups.remove(index), logits)),
                None => index += 1,
            }
        }
        Ok(Advanced {
            chunks: plan.len(),
            tokens,
            complete,
            decoded,
        })
    }
}

/// What one [`Joining::advance`] did.
#[derive(Default)]
pub(super) struct Advanced {
    /// Chunks of groups prefilled (all in one pass of the model).
    pub chunks: usize,
    /// Prompt tokens prefilled, padding included.
    pub tokens: usize,
    /// The groups now complete, with their rows' logits `[rows, vocab]`.
    pub complete: Vec<(Group, Tensor)>,
    /// The logits of the decode step that shared the first pass, if one did.
    pub decoded: Option<Tensor>,
}
