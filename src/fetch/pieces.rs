//! A blob cut into byte ranges ("pieces"), each fetched on a connection of its
//! own, and how far each has come. The record is kept beside the partial file
//! (`blobs/<etag>.pieces.incomplete`), written after the bytes it counts, so a
//! fetch killed at any moment resumes every piece where it stopped and fetches
//! no finished piece again.

use std::path::{Path, PathBuf};

/// The smallest piece: below this a range's own request costs more than the
/// parallelism gains (a CDN's round trip is tens of milliseconds).
const MIN_PIECE: u64 = 4 << 20;
/// The largest piece: small enough that a slow connection holds up little at
/// the end, and the hash (which follows the file in order) never lags far.
const MAX_PIECE: u64 = 128 << 20;

/// The pieces of one blob and the bytes written from each piece's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pieces {
    size: u64,
    piece: u64,
    done: Vec<u64>,
}

impl Pieces {
    /// A file of `size` bytes cut for `connections` connections: about two
    /// pieces a connection, so that a fast connection takes over the end of a
    /// slow one's share, within [`MIN_PIECE`]..[`MAX_PIECE`].
    pub fn plan(size: u64, connections: usize) -> Self {
        let share = size.div_ceil(2 * connections.max(1) as u64);
        let piece = share.clamp(MIN_PIECE, MAX_PIECE);
        Self::cut(size, piece)
    }

    /// The whole file as one piece: one stream, for a server that ignores `Range`.
    pub fn whole(size: u64) -> Self {
        Self::cut(size, size.max(1))
    }

    fn cut(size: u64, piece: u64) -> Self {
        let count = size.div_ceil(piece).max(1) as usize;
        Pieces {
            size,
            piece,
            done: vec![0; count],
        }
    }

    pub fn count(&self) -> usize {
        self.done.len()
    }

    /// Piece `i`'s bytes: `start..end`.
    pub fn range(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.piece;
        (start, (start + self.piece).min(self.size))
    }

    /// Where piece `i` goes on: the first byte it has not written.
    pub fn next_byte(&self, i: usize) -> u64 {
        self.range(i).0 + self.done[i]
    }

    pub fn is_finished(&self, i: usize) -> bool {
        self.next_byte(i) >= self.range(i).1
    }

    /// The pieces still to fetch, in the file's order.
    pub fn unfinished(&self) -> Vec<usize> {
        (0..self.count())
            .filter(|&i| !self.is_finished(i))
            .collect()
    }

    /// Piece `i` wrote `len` more bytes.
    pub fn record(&mut self, i: usize, len: u64) {
        let (start, end) = self.range(i);
        self.done[i] = (self.done[i] + len).min(end - start);
    }

    /// How far the file is whole from its first byte: what can be hashed.
    pub fn frontier(&self) -> u64 {
        match (0..self.count()).find(|&i| !self.is_finished(i)) {
            Some(i) => self.next_byte(i),
            None => self.size,
        }
    }

    pub fn bytes_done(&self) -> u64 {
        self.done.iter().sum()
    }

    pub fn is_complete(&self) -> bool {
        self.frontier() == self.size
    }

    /// The plan of a file whose first `len` bytes are already written (a
    /// partial file of one stream, as Python's `huggingface_hub` and earlier
    /// versions leave it).
    pub fn with_prefix(mut self, len: u64) -> Self {
        for i in 0..self.count() {
            let (start, end) = self.range(i);
            self.done[i] = len.clamp(start, end) - start;
        }
        self
    }

    /// The record as text: `harness-pieces 1`, the size, the piece length, and
    /// the bytes done per piece.
    pub fn to_text(&self) -> String {
        let done: Vec<String> = self.done.iter().map(u64::to_string).collect();
        format!(
            "harness-pieces 1\nsize {}\npiece {}\ndone {}\n",
            self.size,
            self.piece,
            done.join(" ")
        )
    }

    /// A record read back; `None` when it is not one, or not for a file of `size`.
    pub fn from_text(text: &str, size: u64) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != "harness-pieces 1" {
            return None;
        }
        let mut field = |name: &str| lines.next()?.strip_prefix(name)?.strip_prefix(' ');
        let recorded: u64 = field("size")?.parse().ok()?;
        let piece: u64 = field("piece")?.parse().ok()?;
        let done = field("done")?
            .split(' ')
            .map(|d| d.parse().ok())
            .collect::<Option<Vec<u64>>>()?;
        // The count first: a record naming tiny pieces of a large file must
        // not make a huge plan.
        if recorded != size || piece == 0 || size.div_ceil(piece).max(1) != done.len() as u64 {
            return None;
        }
        let mut pieces = Self::cut(size, piece);
        for (i, d) in done.into_iter().enumerate() {
            let (start, end) = pieces.range(i);
            if d > end - start {
                return None;
            }
            pieces.done[i] = d;
        }
        Some(pieces)
    }
}

/// Where a blob's partial download lives: its bytes and its record.
#[derive(Debug, Clone)]
pub(super) struct Partial {
    /// The bytes, each piece at its place (`blobs/<etag>.ranged.incomplete`).
    pub data: PathBuf,
    /// The [`Pieces`] record (`blobs/<etag>.pieces.incomplete`).
    pub record: PathBuf,
    /// A one-stream partial file (`blobs/<etag>.incomplete`, Python's name):
    /// its bytes are a prefix, taken over as such.
    pub stream: PathBuf,
}

impl Partial {
    pub fn new(blob: &Path) -> Self {
        let with = |suffix: &str| {
            let mut name = blob.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        Partial {
            data: with(".ranged.incomplete"),
            record: with(".pieces.incomplete"),
            stream: with(".incomplete"),
        }
    }

    /// Where this file stands: its record when the partial file is there and
    /// holds what the record counts; a one-stream partial file taken over as a
    /// prefix; else a new plan for `connections`.
    pub fn load(&self, size: u64, connections: usize) -> std::io::Result<Pieces> {
        let plan = Pieces::plan(size, connections);
        let data_len = std::fs::metadata(&self.data).ok().map(|m| m.len());
        if let (Some(len), Ok(text)) = (data_len, std::fs::read_to_string(&self.record)) {
            if let Some(pieces) = Pieces::from_text(&text, size) {
                // Every counted byte lies inside the file (pieces write at their
                // place, so the file is as long as its furthest written byte).
                let furthest = (0..pieces.count())
                    .filter(|&i| pieces.done[i] > 0)
                    .map(|i| pieces.next_byte(i))
                    .max()
                    .unwrap_or(0);
                if furthest <= len {
                    return Ok(pieces);
                }
            }
        }
        let _ = std::fs::remove_file(&self.record);
        let stream_len = std::fs::metadata(&self.stream).ok().map(|m| m.len());
        match stream_len {
            Some(len) if len <= size => {
                std::fs::rename(&self.stream, &self.data)?;
                let pieces = plan.with_prefix(len);
                // Recorded at once: a data file without a record is started over.
                self.save(&pieces)?;
                Ok(pieces)
            }
            _ => {
                let _ = std::fs::remove_file(&self.stream);
                let _ = std::fs::remove_file(&self.data);
                Ok(plan)
            }
        }
    }

    /// Writes the record aside, then renames it into place: a kill leaves the
    /// old record or the new one, never half of one.
    pub fn save(&self, pieces: &Pieces) -> std::io::Result<()> {
        let tmp = self.record_aside();
        std::fs::write(&tmp, pieces.to_text())?;
        std::fs::rename(&tmp, &self.record)
    }

    fn record_aside(&self) -> PathBuf {
        let mut tmp = self.record.as_os_str().to_owned();
        tmp.push(".tmp");
        PathBuf::from(tmp)
    }

    /// The bytes the record counts as written (the data file is sparse: its
    /// length is its furthest byte, not what it holds).
    pub fn recorded_bytes(&self, size: u64) -> u64 {
        std::fs::read_to_string(&self.record)
            .ok()
            .and_then(|text| Pieces::from_text(&text, size))
            .map_or(0, |pieces| pieces.bytes_done())
    }

    /// Forgets the partial download (wrong content, or done).
    pub fn remove(&self) {
        for path in [&self.data, &self.record, &self.stream, &self.record_aside()] {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn files_are_cut_about_twice_per_connection_within_bounds() {
        let p = Pieces::plan(2048 * MIB, 8);
        assert_eq!(p.range(0), (0, 128 * MIB));
        assert_eq!(p.count(), 16);
        // Small files are one piece; tiny ones never make empty pieces.
        assert_eq!(Pieces::plan(3 * MIB, 8).count(), 1);
        assert_eq!(Pieces::plan(0, 8).count(), 1);
        assert!(Pieces::plan(0, 8).is_complete());
        // The last piece is what is left.
        let p = Pieces::plan(9 * MIB + 5, 8);
        assert_eq!(p.count(), 3);
        assert_eq!(p.range(2), (8 * MIB, 9 * MIB + 5));
    }

    #[test]
    fn the_frontier_is_the_whole_prefix() {
        let mut p = Pieces::plan(12 * MIB, 8);
        assert_eq!(p.count(), 3);
        p.record(1, 4 * MIB);
        p.record(2, MIB);
        assert_eq!(p.frontier(), 0);
        assert_eq!(p.unfinished(), vec![0, 2]);
        p.record(0, 4 * MIB);
        assert_eq!(p.frontier(), 8 * MIB + MIB);
        assert_eq!(p.next_byte(2), 9 * MIB);
        assert_eq!(p.bytes_done(), 9 * MIB);
        p.record(2, 10 * MIB); // never past its end
        assert!(p.is_complete());
        assert_eq!(p.bytes_done(), 12 * MIB);
    }

    #[test]
    fn records_round_trip_and_refuse_what_does_not_fit() {
        let mut p = Pieces::plan(12 * MIB + 3, 8);
        p.record(1, 77);
        let text = p.to_text();
        assert_eq!(Pieces::from_text(&text, 12 * MIB + 3), Some(p.clone()));
        assert_eq!(Pieces::from_text(&text, 12 * MIB), None, "another size");
        assert_eq!(Pieces::from_text("garbage", 1), None);
        let too_far = text.replace("done 0 77", &format!("done 0 {}", 5 * MIB));
        assert_eq!(Pieces::from_text(&too_far, 12 * MIB + 3), None);
    }

    #[test]
    fn a_one_stream_prefix_is_taken_over() {
        let p = Pieces::plan(12 * MIB, 8).with_prefix(5 * MIB);
        assert_eq!(p.next_byte(0), 4 * MIB);
        assert!(p.is_finished(0));
        assert_eq!(p.next_byte(1), 5 * MIB);
        assert_eq!(p.next_byte(2), 8 * MIB);
        assert_eq!(p.frontier(), 5 * MIB);
    }

    #[test]
    fn a_partial_download_is_loaded_only_when_its_file_holds_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let partial = Partial::new(&dir.path().join("blob"));
        let mut p = Pieces::plan(12 * MIB, 8);
        p.record(2, 100);
        partial.save(&p).unwrap();
        std::fs::write(&partial.data, vec![0u8; (8 * MIB + 100) as usize]).unwrap();
        assert_eq!(partial.load(12 * MIB, 8).unwrap(), p);
        // A file shorter than the record says: start again.
        std::fs::write(&partial.data, b"short").unwrap();
        assert_eq!(
            partial.load(12 * MIB, 8).unwrap(),
            Pieces::plan(12 * MIB, 8)
        );
        assert!(!partial.data.exists() && !partial.record.exists());
        // Python's one-stream partial file becomes the first bytes.
        std::fs::write(&partial.stream, vec![1u8; 1000]).unwrap();
        let loaded = partial.load(12 * MIB, 8).unwrap();
        assert_eq!(loaded.frontier(), 1000);
        assert!(partial.data.exists() && !partial.stream.exists());
        // ... and recorded at once, so a kill now keeps it.
        assert_eq!(partial.recorded_bytes(12 * MIB), 1000);
        assert_eq!(partial.load(12 * MIB, 8).unwrap().frontier(), 1000);
    }

    #[test]
    fn a_record_of_tiny_pieces_for_a_large_file_is_refused_without_a_plan() {
        let text = "harness-pieces 1\nsize 10000000000000\npiece 1\ndone 0\n";
        assert_eq!(Pieces::from_text(text, 10_000_000_000_000), None);
    }
}
