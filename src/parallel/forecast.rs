//! Each rank's weight memory, forecast from the checkpoint's headers alone (`inspect`): every
//! tensor the policy gives a role is planned and counted by a [`ShardLoader`] of that rank, with
//! the rules it loads by, so that the forecast is what the ranks report once loaded.

use crate::checkpoint::source::ResolvedModel;
use crate::checkpoint::WeightSource;
use crate::error::Result;
use crate::parallel::engine::{ShardLoader, WeightBytes};
use crate::parallel::slicing::Plan;
use crate::policy::{Policy, Role};
use crate::WeightDType;

/// One stored tensor and what each rank would hold of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorForecast {
    /// The tensor's name as the checkpoint stores it.
    pub name: String,
    /// Its stored shape.
    pub shape: Vec<usize>,
    /// How the policy splits it.
    pub role: Role,
    /// Each rank's slice: its shape as the model receives it, and its bytes.
    pub slices: Vec<(Vec<usize>, u64)>,
}

/// What every rank would hold of a model.
#[derive(Debug, Clone)]
pub struct Forecast {
    /// The split the ranks follow.
    pub plan: Plan,
    /// The slicing policy: the model's policy file's, else its family's built-in one.
    pub policy: Policy,
    /// The tensors that ranks load, in the checkpoint's order.
    pub tensors: Vec<TensorForecast>,
    /// The tensors no rank loads (no role in the policy).
    pub unused: Vec<String>,
    /// Each rank's weight bytes, as [`RankMemory::weights`](crate::RankMemory) reports them.
    pub ranks: Vec<WeightBytes>,
}

impl Forecast {
    /// Forecasts what each of `ranks` ranks holds of `model` in `dtype`, reading only the
    /// weights' headers.
    pub fn of(model: &ResolvedModel, ranks: usize, dtype: WeightDType) -> Result<Self> {
        let source = model.location.open(&model.config)?;
        let plan = Plan::new(&model.config, ranks)?;
        let policy = model
            .policy
            .clone()
            .unwrap_or_else(|| Policy::for_config(&model.config));
        let mut out = Forecast {
            tensors: Vec::new(),
            unused: Vec::new(),
            ranks: vec![WeightBytes::default(); ranks],
            plan,
            policy,
        };
        out.count(source.as_ref(), dtype)?;
        Ok(out)
    }

    /// Plans and counts every tensor of `source`, for every rank.
    fn count(&mut self, source: &dyn WeightSource, dtype: WeightDType) -> Result<()> {
        let (policy, plan) = (&self.policy, &self.plan);
        let loaders: Vec<ShardLoader> = (0..plan.world_size)
            .map(|rank| ShardLoader::new(source, policy, plan, rank, dtype))
            .collect();
        for name in source.names() {
            let (Some(role), Some(shape)) = (policy.role_of(&name), source.shape(&name)) else {
                self.unused.push(name);
                continue;
            };
            let mut slices = Vec::with_capacity(loaders.len());
            for (loader, total) in loaders.iter().zip(&mut self.ranks) {
                let (slice, bytes) = loader.forecast(&name, role, &shape)?;
                total.add(role, bytes);
                slices.push((slice.shape, bytes));
            }
            self.tensors.push(TensorForecast {
                name,
                shape,
                role: role.clone(),
                slices,
            });
        }
        Ok(())
    }
}
