//! How far a rank has got loading its shard: the checkpoint's tensors it has read, weighed by
//! their number of elements, reported a few times a second at most (a large model has
//! thousands of tensors; the main process hears a handful of reports, not one per tensor).

use std::collections::HashSet;

use crate::checkpoint::WeightSource;
use crate::error::Result;
use crate::progress::Throttle;

/// Where a meter's reports go: `(done, total)` elements; an error stops the load.
pub type LoadReport<'a> = &'a mut dyn FnMut(u64, u64) -> Result<()>;

/// Counts the tensors a rank has read and reports the count through a [`LoadReport`].
pub struct LoadMeter<'a> {
    total: u64,
    done: u64,
    /// Tensors already counted (a tensor several blocks share is read more than once).
    counted: HashSet<String>,
    throttle: Throttle,
    report: LoadReport<'a>,
}

impl<'a> LoadMeter<'a> {
    /// A meter of loading from `source`, whose total is the elements of all its tensors;
    /// reports 0 done at once.
    pub fn start(source: &dyn WeightSource, report: LoadReport<'a>) -> Result<Self> {
        let total = source
            .names()
            .iter()
            .filter_map(|name| source.shape(name))
            .map(|shape| elements(&shape))
            .sum();
        let mut meter = LoadMeter {
            total,
            done: 0,
            counted: HashSet::new(),
            throttle: Throttle::default(),
            report,
        };
        meter.send()?;
        Ok(meter)
    }

    /// Counts stored tensor `name` of `shape` as read (once), reporting when a report is due.
    pub fn read(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        if self.counted.insert(name.to_string()) {
            self.done = (self.done + elements(shape)).min(self.total);
            self.send()?;
        }
        Ok(())
    }

    /// Reports the load complete: tensors the model did not ask for count as read.
    pub fn finish(&mut self) -> Result<()> {
        self.done = self.total;
        self.send()
    }

    fn send(&mut self) -> Result<()> {
        match self.throttle.due(self.done, self.total) {
            true => (self.report)(self.done, self.total),
            false => Ok(()),
        }
    }
}

/// The number of elements of a tensor of `shape`.
fn elements(shape: &[usize]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::ops::Range;
    use std::path::Path;

    /// A source of two tensors, 2×3 and 4, that reads nothing.
    struct Shapes;

    impl WeightSource for Shapes {
        fn location(&self) -> &Path {
            Path::new("shapes")
        }
        fn shape(&self, name: &str) -> Option<Vec<usize>> {
            match name {
                "a" => Some(vec![2, 3]),
                "b" => Some(vec![4]),
                _ => None,
            }
        }
        fn names(&self) -> Vec<String> {
            vec!["a".into(), "b".into()]
        }
        fn read(&self, name: &str, _: Option<(Range<usize>, Range<usize>)>) -> Result<Tensor> {
            Err(crate::Error::InvalidInput(format!(
                "{name} is not readable"
            )))
        }
    }

    /// What a meter over [`Shapes`] reports for `reads` of its tensors, then two finishes.
    fn reports_of(reads: &[(&str, &[usize])]) -> Vec<(u64, u64)> {
        let mut reports = Vec::new();
        let mut report = |done, total| {
            reports.push((done, total));
            Ok(())
        };
        let mut meter = LoadMeter::start(&Shapes, &mut report).unwrap();
        for (name, shape) in reads {
            meter.read(name, shape).unwrap();
        }
        meter.finish().unwrap();
        meter.finish().unwrap();
        reports
    }

    #[test]
    fn a_meter_reports_zero_then_the_total_counting_each_tensor_once() {
        // A tensor read twice counts once; one never read counts at the finish.
        assert_eq!(
            reports_of(&[("a", &[2, 3]), ("a", &[2, 3])]),
            vec![(0, 10), (10, 10)]
        );
        assert_eq!(
            reports_of(&[("a", &[2, 3]), ("b", &[4])]),
            vec![(0, 10), (10, 10)]
        );
    }

    #[test]
    fn a_failing_report_stops_the_load() {
        let mut report = |_, _| Err(crate::Error::Launch("lost the launcher".into()));
        assert!(LoadMeter::start(&Shapes, &mut report).is_err());
    }
}
