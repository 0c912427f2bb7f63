//! The communicator's shared memory is released by `deparallelize`. Alone in its own test
//! binary so that no other test's model holds a region at the same time.

mod common;

use common::{fixture, open_comm_regions, options};
use parallelformers::parallelize;

#[test]
fn deparallelize_closes_the_communicator_region_in_the_main_process() {
    let model = parallelize(fixture("qwen2"), options(3)).unwrap();
    assert_eq!(
        open_comm_regions(),
        1,
        "the launcher holds the region while the model runs"
    );
    model.deparallelize();
    assert_eq!(
        open_comm_regions(),
        0,
        "the communicator region is still open"
    );
}
