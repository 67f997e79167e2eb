//! `harness fetch` on a terminal: a bar per file downloading now (name, bytes,
//! rate, ETA) above one for the whole fetch, redrawn from
//! [`FetchProgress::snapshot`] ten times a second, with the log lines printed
//! above the bars. A file that finishes leaves a line saying what came down.
//! Off a terminal (a deploy watched through its logs) nothing is drawn.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::mpsc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::fetch::progress::human_bytes;
use crate::fetch::{FetchProgress, ProgressSnapshot};

/// How often the bars are read from the fetch's progress.
const REFRESH: Duration = Duration::from_millis(100);

/// The total bar's name.
const TOTAL: &str = "total";

/// Bars on stderr, when stderr is a terminal that draws them (not `TERM=dumb`).
pub(super) fn terminal() -> Option<MultiProgress> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(20));
    (!multi.is_hidden()).then_some(multi)
}

/// Runs `work` (the fetch) while drawing `progress` on `multi`, with the log
/// lines printed above the bars. Then the bars end: on success as lines saying
/// what was downloaded, on failure left as they stood.
pub(super) fn draw_while<T, E>(
    multi: MultiProgress,
    progress: &FetchProgress,
    work: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let route = multi.clone();
    harness_client::cli::route_logs(Some(Box::new(move |line| {
        route.suspend(|| {
            let _ = std::io::stderr().write_all(line);
        });
    })));
    // Log lines go straight to stderr again however this ends.
    struct Unroute;
    impl Drop for Unroute {
        fn drop(&mut self) {
            harness_client::cli::route_logs(None);
        }
    }
    let _unroute = Unroute;

    let bars = Bars::new(multi);
    let (stop, stopped) = mpsc::channel::<()>();
    let (result, bars) = std::thread::scope(|scope| {
        let drawer = scope.spawn(move || {
            let mut bars = bars;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
                bars.update(&progress.snapshot());
            }
            bars
        });
        let result = work();
        drop(stop);
        let bars = drawer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (result, bars)
    });
    bars.end(&progress.snapshot(), result.is_ok());
    result
}

/// The bars drawn so far.
struct Bars {
    multi: MultiProgress,
    /// The whole fetch's bar, from the first file downloaded (or waited for):
    /// a fetch served from the cache draws nothing.
    total: Option<Drawn>,
    /// The files downloading now.
    files: HashMap<String, Drawn>,
    /// Files gone from the progress since the last reading: done, unless the
    /// fetch fails right after (a failed file leaves the progress too).
    ended: Vec<(String, Drawn)>,
    /// The width of the names column.
    name_width: usize,
}

/// A bar, and the bytes it stood at when drawn first (held before: cached, or
/// downloaded by an earlier run), which its average rate leaves out.
struct Drawn {
    bar: ProgressBar,
    from: u64,
}

impl Bars {
    fn new(multi: MultiProgress) -> Self {
        Bars {
            multi,
            total: None,
            files: HashMap::new(),
            ended: Vec::new(),
            name_width: TOTAL.len(),
        }
    }

    fn style(&self) -> ProgressStyle {
        let template = format!(
            "{{prefix:<{}!}} {{wide_bar:.cyan/blue}} {{binary_bytes:>10}} / {{binary_total_bytes:<10}} \
             {{binary_bytes_per_sec:>12}}  ETA {{eta:<4}}{{msg}}",
            self.name_width
        );
        ProgressStyle::with_template(&template)
            .expect("a valid template")
            .progress_chars("█▉▊▋▌▍▎▏ ")
    }

    /// Draws a reading of the fetch's progress.
    fn update(&mut self, now: &ProgressSnapshot) {
        // Files that left the progress a reading ago, while the fetch went on.
        for (file, drawn) in std::mem::take(&mut self.ended) {
            self.done(&file, drawn);
        }
        if self.total.is_none() && now.files.is_empty() && now.waiting.is_none() {
            return;
        }
        let widest = now.files.iter().map(|f| f.file.chars().count()).max();
        let widest = widest.unwrap_or(0).clamp(self.name_width, 40);
        if widest > self.name_width {
            self.name_width = widest;
            let style = self.style();
            for drawn in self.files.values().chain(&self.total) {
                drawn.bar.set_style(style.clone());
            }
        }
        if self.total.is_none() {
            let bar = self.start(TOTAL, now.bytes_done, now.bytes_total, |bar| {
                self.multi.add(bar)
            });
            self.total = Some(Drawn {
                bar,
                from: now.bytes_done,
            });
        }
        let total = self.total.as_ref().expect("drawn above");

        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|file| !now.files.iter().any(|f| &f.file == *file))
            .cloned()
            .collect();
        for file in gone {
            let drawn = self.files.remove(&file).expect("listed above");
            self.ended.push((file, drawn));
        }
        for file in &now.files {
            if let Some(drawn) = self.files.get(&file.file) {
                set(&drawn.bar, file.bytes_done, file.bytes_total);
            } else {
                let bar = self.start(&file.file, file.bytes_done, file.bytes_total, |bar| {
                    self.multi.insert_before(&total.bar, bar)
                });
                self.files.insert(
                    file.file.clone(),
                    Drawn {
                        bar,
                        from: file.bytes_done,
                    },
                );
            }
        }
        // The log line above says for what.
        let waiting = if now.waiting.is_some() {
            " (waiting for another process)"
        } else {
            ""
        };
        total.bar.set_message(waiting);
        set(&total.bar, now.bytes_done, now.bytes_total);
        // Every bar at this reading, on the screen now (their own draws are
        // rate limited).
        total.bar.force_draw();
    }

    /// A new bar at `done` of `total` bytes, drawn at once where `place` puts
    /// it; its rate counts from there.
    fn start(
        &self,
        name: &str,
        done: u64,
        total: u64,
        place: impl FnOnce(ProgressBar) -> ProgressBar,
    ) -> ProgressBar {
        let bar = place(
            ProgressBar::new(total)
                .with_style(self.style())
                .with_prefix(name.to_string())
                .with_position(done),
        );
        // Drawn before its bytes next move, and the bytes held already are no
        // part of its rate.
        bar.tick();
        bar.reset_eta();
        bar.force_draw();
        bar
    }

    /// Replaces a finished bar with a line saying what came down, and how fast.
    fn done(&self, name: &str, drawn: Drawn) {
        let size = drawn.bar.length().unwrap_or_else(|| drawn.bar.position());
        let elapsed = drawn.bar.elapsed();
        let rate = size.saturating_sub(drawn.from) as f64 / elapsed.as_secs_f64().max(1e-3);
        drawn.bar.finish_and_clear();
        self.multi.remove(&drawn.bar);
        let _ = self.multi.println(format!(
            "{name:<width$} {:>10} in {:.1}s ({}/s)",
            human_bytes(size),
            elapsed.as_secs_f64(),
            human_bytes(rate as u64),
            width = self.name_width,
        ));
    }

    /// The fetch ended: done files and the total become lines, or, when it
    /// failed, every bar stays as it stood.
    fn end(mut self, last: &ProgressSnapshot, ok: bool) {
        if !ok {
            let ended = self.ended.iter().map(|(_, drawn)| drawn);
            for drawn in ended.chain(self.files.values()).chain(&self.total) {
                drawn.bar.abandon();
            }
            return;
        }
        self.update(last);
        let ended = std::mem::take(&mut self.ended);
        let files = std::mem::take(&mut self.files);
        for (file, drawn) in ended.into_iter().chain(files) {
            self.done(&file, drawn);
        }
        if let Some(total) = self.total.take() {
            total.bar.set_position(last.bytes_done);
            self.done(TOTAL, total);
        }
    }
}

/// Moves `bar` to `done` of `total` bytes, its rate and its line included
/// (`set_position` alone may leave its line as it was).
fn set(bar: &ProgressBar, done: u64, total: u64) {
    bar.set_length(total);
    bar.set_position(done);
    bar.tick();
}
