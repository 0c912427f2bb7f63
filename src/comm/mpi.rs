//! [`MpiCommunicator`]: the collectives over MPI (Open MPI), for ranks on several hosts started
//! by `mpirun` (cargo feature `mpi`).
//!
//! Determinism as the trait requires: a sum is not left to `MPI_Allreduce`, whose algorithms
//! may add in a different order on different ranks; every rank gathers every rank's buffer and
//! adds them in rank order `0, 1, .., N-1` itself. Each collective first gathers every rank's
//! length (and root), so that a mismatch is an error on every rank rather than a truncated
//! message or a hang.

use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};

use super::{CommError, Communicator};

/// A communicator that MPI calls may use from any thread: MPI is initialised with
/// `MPI_THREAD_MULTIPLE` (checked by [`crate::parallel::mpi`]) before any is made.
pub struct SharedComm(pub SimpleCommunicator);

// SAFETY: an MPI communicator handle may be used from several threads at once under
// MPI_THREAD_MULTIPLE, the only threading level this crate initialises MPI with.
unsafe impl Send for SharedComm {}
// SAFETY: as above.
unsafe impl Sync for SharedComm {}

/// The collectives of one tensor-parallel group over an MPI communicator of its own.
pub struct MpiCommunicator {
    comm: SharedComm,
    rank: usize,
    world_size: usize,
}

impl MpiCommunicator {
    /// Collectives over `comm` (a communicator no other traffic uses).
    pub fn new(comm: SimpleCommunicator) -> Self {
        let (rank, world_size) = (comm.rank() as usize, comm.size() as usize);
        MpiCommunicator {
            comm: SharedComm(comm),
            rank,
            world_size,
        }
    }

    /// Every rank's `value`, in rank order.
    fn gather_values(&self, value: u64) -> Vec<u64> {
        let mut all = vec![0u64; self.world_size];
        self.comm.0.all_gather_into(&value, &mut all[..]);
        all
    }

    /// Every rank's length; an error naming the first that differs from rank 0's.
    fn equal_lengths(&self, len: usize) -> Result<(), CommError> {
        let lengths = self.gather_values(len as u64);
        match lengths.iter().position(|&l| l != lengths[0]) {
            Some(rank) => Err(CommError::LengthMismatch {
                rank,
                expected: lengths[0] as usize,
                got: lengths[rank] as usize,
            }),
            None => Ok(()),
        }
    }

    /// `local` of every rank, concatenated in rank order.
    fn gather(&self, local: &[f32], lengths: &[u64]) -> Vec<f32> {
        let counts: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
        let displs: Vec<i32> = counts
            .iter()
            .scan(0, |at, &c| {
                let start = *at;
                *at += c;
                Some(start)
            })
            .collect();
        let mut all = vec![0f32; lengths.iter().sum::<u64>() as usize];
        let mut partition = PartitionMut::new(&mut all[..], counts, &displs[..]);
        self.comm.0.all_gather_varcount_into(local, &mut partition);
        all
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.equal_lengths(buf.len())?;
        let all = self.gather(buf, &vec![buf.len() as u64; self.world_size]);
        let mut parts = all.chunks_exact(buf.len().max(1));
        if let Some(first) = parts.next() {
            buf.copy_from_slice(&first[..buf.len()]);
        }
        for part in parts {
            buf.iter_mut().zip(part).for_each(|(sum, x)| *sum += x);
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let lengths = self.gather_values(local.len() as u64);
        Ok(self.gather(local, &lengths))
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let roots = self.gather_values(root as u64);
        if let Some(rank) = roots.iter().position(|&r| r != roots[0]) {
            return Err(CommError::RootMismatch {
                rank,
                expected: roots[0] as usize,
                got: roots[rank] as usize,
            });
        }
        if root >= self.world_size {
            return Err(CommError::InvalidRoot {
                root,
                world_size: self.world_size,
            });
        }
        self.equal_lengths(buf.len())?;
        self.comm.0.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.comm.0.barrier();
        Ok(())
    }
}
