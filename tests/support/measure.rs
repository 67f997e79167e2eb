//! Measuring: percentiles of samples, and the benches' knobs read from the
//! environment.

/// The value at `p` (0 to 1) of `sorted` (ascending) samples, by nearest rank:
/// `p = 0.5` is the median, `p = 0.99` the 99th percentile. The default (zero)
/// when there are no samples.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    match sorted.len() {
        0 => T::default(),
        n => sorted[((n - 1) as f64 * p).round() as usize],
    }
}

/// The number in the environment variable `name`, or `default` when it is unset
/// or not a number (the benches' sizes: `HARNESS_BENCH_CALLS` and the like).
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `caller(i)` for each `i` in `0..callers`, each on a task of its own, all
/// at once, and waits for them all; their outputs, in order.
pub async fn all_at_once<T, Fut>(callers: usize, caller: impl Fn(usize) -> Fut) -> Vec<T>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = (0..callers).map(|i| tokio::spawn(caller(i))).collect();
    let mut outputs = Vec::with_capacity(callers);
    for task in tasks {
        outputs.push(task.await.expect("a caller panicked"));
    }
    outputs
}

/// Prints a bench's result table's head, as `BENCHMARKS.md` shows it: `title`,
/// a blank line, then the Markdown header row of `columns`.
pub fn print_table_head(title: &str, columns: &[&str]) {
    println!("{title}");
    println!();
    println!("| {} |", columns.join(" | "));
    println!("|{}", " --- |".repeat(columns.len()));
}

/// Sentences of 4 to 40 words from a fixed vocabulary, the same every run: the
/// length spread of ordinary English sentences. The embedding benches share
/// them, so their figures are of the same texts.
pub fn sentences(n: usize) -> Vec<String> {
    let words = [
        "the",
        "a",
        "model",
        "serves",
        "vectors",
        "quickly",
        "under",
        "load",
        "while",
        "every",
        "request",
        "is",
        "answered",
        "with",
        "care",
        "and",
        "nothing",
        "gets",
        "lost",
        "cluster",
        "machine",
        "learning",
        "text",
        "embedding",
        "search",
        "similar",
        "documents",
        "query",
        "results",
        "ranked",
        "by",
        "cosine",
        "distance",
        "from",
        "user",
        "question",
        "about",
        "weather",
        "in",
        "Paris",
        "tomorrow",
        "morning",
        "library",
        "books",
        "written",
        "long",
    ];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let len = 4 + (next() % 37) as usize;
            let mut s: Vec<&str> = (0..len)
                .map(|_| words[(next() % words.len() as u64) as usize])
                .collect();
            s[0] = "The";
            format!("{}.", s.join(" "))
        })
        .collect()
}
