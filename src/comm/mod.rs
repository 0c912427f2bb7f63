//! Collective communication among the ranks of one tensor-parallel group.
//!
//! Megatron-style tensor parallelism needs only a handful of collectives:
//!
//! * [`Communicator::all_reduce_sum`] after every row-parallel linear layer (attention output
//!   projection, MLP down projection), so each rank holds the full activation again;
//! * [`Communicator::all_gather`] to reassemble column-sharded logits (the vocabulary may be split
//!   unevenly, so parts may differ in length);
//! * [`Communicator::broadcast`] to hand rank 0's decision (a sampled token, a request) to
//!   everyone;
//! * [`Communicator::barrier`] for start-up and shutdown.
//!
//! Determinism matters: all ranks must stay bit-identical, otherwise greedy decoding on different
//! ranks could pick different tokens and the group would silently diverge. Every implementation
//! therefore sums in the fixed rank order `0, 1, .., N-1`, whatever order the ranks arrive in.
//!
//! Two implementations exist:
//!
//! * [`SingleRank`] — world size 1; every operation is a no-op (or a copy);
//! * [`ShmCommunicator`] — ranks are separate OS processes (or threads, in tests) on one host
//!   that share an anonymous memory region created by [`ShmRegion::create`]; see [`shm`] for the
//!   protocol.
//!
//! All collectives are *collective*: every rank of the group must call the same operations in the
//! same order. Violations that can be detected (different operations, different lengths,
//! different roots) are reported as a [`CommError`] on **every** rank, and the group stays usable.

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod shm;
pub mod timing;

pub use shm::{Heartbeat, ShmCommunicator, ShmRegion, DEFAULT_SLOT_BYTES};

/// Errors returned by collective operations and by setting up a communicator.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The group was aborted (usually because a rank died); no further collective can succeed.
    #[error("communicator aborted: another rank failed or the launcher shut the group down")]
    Aborted,
    /// Ranks passed buffers of different lengths to an operation that needs equal lengths.
    #[error("length mismatch: rank {rank} passed {got} elements, rank 0 passed {expected}")]
    LengthMismatch {
        /// The first rank whose length differs from rank 0's.
        rank: usize,
        /// Rank 0's length.
        expected: usize,
        /// The length passed by `rank`.
        got: usize,
    },
    /// Ranks called different collectives at the same point of the protocol.
    #[error("collective mismatch: rank {rank} called {got} while rank 0 called {expected}")]
    CollectiveMismatch {
        /// The first rank whose operation differs from rank 0's.
        rank: usize,
        /// The operation called by rank 0.
        expected: &'static str,
        /// The operation called by `rank`.
        got: &'static str,
    },
    /// A broadcast root outside `0..world_size`.
    #[error("invalid broadcast root {root} for world size {world_size}")]
    InvalidRoot {
        /// The root that was passed.
        root: usize,
        /// The size of the group.
        world_size: usize,
    },
    /// Ranks passed different roots to the same broadcast.
    #[error("root mismatch: rank {rank} named root {got}, rank 0 named root {expected}")]
    RootMismatch {
        /// The first rank whose root differs from rank 0's.
        rank: usize,
        /// Rank 0's root.
        expected: usize,
        /// The root named by `rank`.
        got: usize,
    },
    /// A rank index outside `0..world_size`.
    #[error("invalid rank {rank} for world size {world_size}")]
    InvalidRank {
        /// The rank that was passed.
        rank: usize,
        /// The size of the group.
        world_size: usize,
    },
    /// A world size of zero, or one too large to lay out in memory.
    #[error("invalid world size {world_size}")]
    InvalidWorldSize {
        /// The world size that was passed.
        world_size: usize,
    },
    /// A slot size that is zero, not a multiple of 4 bytes, or too large to lay out in memory.
    #[error("invalid slot size {slot_bytes} bytes (must be a positive multiple of 4)")]
    InvalidSlotSize {
        /// The slot size that was passed.
        slot_bytes: usize,
    },
    /// The region was created for a different world size than the attaching rank expects.
    #[error("world size mismatch: expected {expected}, the shared region was created for {found}")]
    WorldSizeMismatch {
        /// The world size the caller passed.
        expected: usize,
        /// The world size recorded in the region's header.
        found: usize,
    },
    /// The shared file is smaller than the layout recorded in its header requires.
    #[error("shared region too small: {size} bytes, at least {required} required")]
    RegionTooSmall {
        /// The size of the file behind the descriptor.
        size: u64,
        /// The size the layout requires.
        required: u64,
    },
    /// The descriptor does not refer to a communicator region (bad magic number or version).
    #[error("file descriptor does not refer to a parallelformers communicator region")]
    NotARegion,
    /// Another communicator already attached to this rank of the region.
    #[error("rank {rank} is already attached to this shared region")]
    RankInUse {
        /// The rank that was requested.
        rank: usize,
    },
    /// Creating or sizing the shared-memory file failed.
    #[error("creating the shared-memory region failed: {0}")]
    Create(#[source] std::io::Error),
    /// Inspecting or mapping the shared-memory file failed.
    #[error("mapping the shared-memory region failed: {0}")]
    Map(#[source] std::io::Error),
}

/// Collective operations among the ranks of one tensor-parallel group.
pub trait Communicator: Send {
    /// This rank's index in `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks in the group.
    fn world_size(&self) -> usize;
    /// In-place element-wise sum across ranks. Every rank must end with bit-identical results:
    /// sum in fixed rank order 0,1,..,N-1 regardless of arrival order.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Concatenate every rank's `local` in rank order; lengths may differ between ranks (uneven
    /// shards) and may be zero. Every rank receives the full concatenation.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError>;
    /// Copy `buf` of `root` into `buf` of every other rank (all ranks pass the same length).
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<(), CommError>;
    /// Wait until every rank has arrived.
    fn barrier(&self) -> Result<(), CommError>;
}

/// The communicator of a group with a single rank: rank 0 of 1.
///
/// Reductions and broadcasts leave the buffer untouched, a gather returns a copy of the local
/// part, and a barrier returns at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(local.to_vec())
    }

    fn broadcast(&self, _buf: &mut [u8], root: usize) -> Result<(), CommError> {
        if root == 0 {
            Ok(())
        } else {
            Err(CommError::InvalidRoot {
                root,
                world_size: 1,
            })
        }
    }

    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_is_rank_zero_of_a_group_of_one() {
        let comm: Box<dyn Communicator> = Box::new(SingleRank);
        assert_eq!(comm.rank(), 0);
        assert_eq!(comm.world_size(), 1);
        comm.barrier().expect("barrier");
    }

    #[test]
    fn single_rank_reduce_and_broadcast_leave_the_buffer_unchanged() {
        let comm = SingleRank;
        let mut floats = vec![1.5f32, -2.25, 3.0];
        comm.all_reduce_sum(&mut floats).expect("all_reduce");
        assert_eq!(floats, vec![1.5, -2.25, 3.0]);
        let mut empty: Vec<f32> = Vec::new();
        comm.all_reduce_sum(&mut empty).expect("empty all_reduce");
        let mut bytes = vec![7u8, 8, 9];
        comm.broadcast(&mut bytes, 0).expect("broadcast");
        assert_eq!(bytes, vec![7, 8, 9]);
    }

    #[test]
    fn single_rank_gather_returns_a_copy_of_the_local_part() {
        let comm = SingleRank;
        assert_eq!(
            comm.all_gather(&[4.0, 5.0]).expect("gather"),
            vec![4.0, 5.0]
        );
        assert!(comm.all_gather(&[]).expect("empty gather").is_empty());
    }

    #[test]
    fn single_rank_rejects_a_broadcast_root_other_than_zero() {
        let err = SingleRank
            .broadcast(&mut [1u8], 1)
            .expect_err("root 1 must be rejected");
        assert!(matches!(
            err,
            CommError::InvalidRoot {
                root: 1,
                world_size: 1
            }
        ));
    }
}
