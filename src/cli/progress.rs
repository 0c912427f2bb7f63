//! Progress bars on standard error while a model is fetched and loaded, as the Hugging Face
//! tools draw them: one bar per download, then one line per rank while the ranks load, all
//! cleared once every rank has loaded. Drawn only when standard error is a terminal; pipes and
//! files see nothing of them.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use parallelformers::{Progress, ProgressSink};

/// How a download's bar looks.
const DOWNLOAD_STYLE: &str =
    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} (eta {eta})";
/// How a rank's bar looks.
const RANK_STYLE: &str = "{msg} [{bar:30}] {percent:>3}% ({elapsed})";

/// A sink that draws the progress on standard error, or `None` when standard error is not a
/// terminal. The bars are cleared when the sink's last clone is dropped (a failed load leaves
/// nothing behind its error message).
pub fn terminal() -> Option<ProgressSink> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bars = Mutex::new(Bars::default());
    Some(ProgressSink::new(move |event| {
        if let Ok(mut bars) = bars.lock() {
            bars.show(event);
        }
    }))
}

/// The bars on the screen.
#[derive(Default)]
struct Bars {
    /// Where the bars are drawn (standard error).
    screen: MultiProgress,
    /// The file being downloaded and its bar.
    download: Option<(String, ProgressBar)>,
    /// Each loading rank's bar, by rank.
    ranks: BTreeMap<usize, ProgressBar>,
}

impl Bars {
    fn show(&mut self, event: &Progress<'_>) {
        match *event {
            Progress::Fetching { file, done, total } => {
                self.download(file, total).set_position(done)
            }
            Progress::Fetched { file } => {
                if let Some((_, bar)) = self.download.take_if(|(name, _)| name == file) {
                    bar.finish_and_clear();
                }
            }
            Progress::Loading { rank, done, total } => self.rank(rank, total).set_position(done),
            Progress::Loaded => self.clear_ranks(),
        }
    }

    /// The bar of the download of `file` (`total` bytes), replacing another's.
    fn download(&mut self, file: &str, total: u64) -> &ProgressBar {
        if self.download.as_ref().is_some_and(|(name, _)| name != file) {
            if let Some((_, bar)) = self.download.take() {
                bar.finish_and_clear();
            }
        }
        let (_, bar) = self.download.get_or_insert_with(|| {
            let bar = styled(total, DOWNLOAD_STYLE, format!("downloading {file}"));
            (file.to_string(), self.screen.add(bar))
        });
        set_length(bar, total)
    }

    /// The bar of rank `rank` (`total` elements), placed below a download's and among the
    /// other ranks' in rank order.
    fn rank(&mut self, rank: usize, total: u64) -> &ProgressBar {
        let position = usize::from(self.download.is_some()) + self.ranks.range(..rank).count();
        let screen = &self.screen;
        let bar = self.ranks.entry(rank).or_insert_with(|| {
            let bar = styled(total, RANK_STYLE, format!("loading rank {rank}"));
            screen.insert(position, bar)
        });
        set_length(bar, total)
    }

    fn clear_ranks(&mut self) {
        for bar in std::mem::take(&mut self.ranks).into_values() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some((_, bar)) = self.download.take() {
            bar.finish_and_clear();
        }
        self.clear_ranks();
    }
}

/// A bar of length `total` that shows `message`, drawn with `template` (a plain bar if the
/// template were invalid).
fn styled(total: u64, template: &str, message: String) -> ProgressBar {
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::new(total)
        .with_style(style)
        .with_message(message)
}

/// `bar`, made `total` long (without a redraw when it already is).
fn set_length(bar: &ProgressBar, total: u64) -> &ProgressBar {
    if bar.length() != Some(total) {
        bar.set_length(total);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_templates_are_valid() {
        for template in [DOWNLOAD_STYLE, RANK_STYLE] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }
}
