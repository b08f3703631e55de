//! Optional on-disk queue (`[export.queue] dir`): batches that could not be
//! delivered survive a collector outage and an agent restart, within
//! `disk_max_bytes`, and are sent oldest first.
//!
//! One file per batch, named by a sequence number so the directory listing
//! is the order. Each file is a 24-byte header then the encoded request:
//!
//! ```text
//! magic "PERCHQ01" | payload length u32 LE | points u32 LE | crc32 u32 LE | reserved u32
//! ```
//!
//! Files are written to `*.tmp` and renamed, so a crash leaves either a
//! whole file or a `.tmp` that is removed at start. A file whose header,
//! length or checksum is wrong (a torn write, disk corruption) is moved
//! aside as `*.corrupt` with one log line naming it; the other files are
//! still delivered. At most [`MAX_CORRUPT_FILES`] `.corrupt` files are
//! kept, none older than [`CORRUPT_MAX_AGE`]; the others are deleted
//! (at open and whenever one is set aside) and counted in
//! `perch.export.disk.corrupt.removed`.
//!
//! The queue holds metric data, maybe with peer addresses: the directory
//! is made 0700 and each file 0600, set explicitly, whatever the umask.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use bytes::Bytes;

const MAGIC: &[u8; 8] = b"PERCHQ01";
const HEADER: usize = 24;
const EXT: &str = "otlpq";

/// `.corrupt` files kept for inspection (the newest ones). A batch is at
/// most `batch.max_bytes` (3 MiB), so they hold at most 24 MiB.
pub const MAX_CORRUPT_FILES: usize = 8;
/// `.corrupt` files older than this are deleted.
pub const CORRUPT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// A disk-queue failure, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The directory or a file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not a valid queue file.
    #[error("{path}: corrupt queue file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// One queued batch on disk.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    bytes: u64,
    path: PathBuf,
}

/// The directory and its index (sizes, order).
#[derive(Debug)]
pub struct DiskQueue {
    dir: PathBuf,
    max_bytes: u64,
    entries: VecDeque<Entry>,
    total: u64,
    next_seq: u64,
    /// `.corrupt` files deleted and not yet reported.
    corrupt_removed: u64,
}

/// A batch read back from disk.
#[derive(Debug)]
pub struct DiskBatch {
    pub seq: u64,
    pub body: Bytes,
    pub points: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Encodes a queue file.
pub fn encode_file(body: &[u8], points: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&(points.min(u64::from(u32::MAX)) as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(body);
    out
}

/// Decodes a queue file: `(payload, points)` or why it is corrupt.
pub fn decode_file(data: &[u8]) -> Result<(&[u8], u64), String> {
    if data.len() < HEADER {
        return Err(format!("{} bytes, shorter than the header", data.len()));
    }
    if &data[..8] != MAGIC {
        return Err("bad magic".to_owned());
    }
    let word = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let len = word(8) as usize;
    let points = u64::from(word(12));
    let crc = word(16);
    let body = &data[HEADER..];
    if body.len() != len {
        return Err(format!(
            "payload is {} bytes, header says {len}",
            body.len()
        ));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".to_owned());
    }
    Ok((body, points))
}

impl DiskQueue {
    /// Opens (creating) `dir` and indexes the files already there.
    /// Corrupt files are found lazily, when read.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, DiskError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io(dir))?;
        // Also for a directory made earlier, or with a umask that cut the
        // mode: the mode at create is masked, chmod is not.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(io(dir))?;
        let mut entries = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".corrupt") {
                continue;
            }
            if name.ends_with(".tmp") {
                // An interrupted write: never complete, never renamed.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(seq) = name
                .strip_suffix(&format!(".{EXT}"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
            entries.push(Entry { seq, bytes, path });
        }
        entries.sort_by_key(|e| e.seq);
        let total = entries.iter().map(|e| e.bytes).sum();
        let next_seq = entries.last().map_or(0, |e| e.seq + 1);
        let mut q = Self {
            dir: dir.to_owned(),
            max_bytes,
            entries: entries.into(),
            total,
            next_seq,
            corrupt_removed: 0,
        };
        q.prune_corrupt(std::time::SystemTime::now());
        Ok(q)
    }

    /// Deletes `.corrupt` files past [`CORRUPT_MAX_AGE`] (by mtime) and
    /// all but the newest [`MAX_CORRUPT_FILES`]. Returns how many went.
    pub fn prune_corrupt(&mut self, now: std::time::SystemTime) -> u64 {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".corrupt"))
            .map(|e| {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (t, e.path())
            })
            .collect();
        // Newest first; ties by name so the order is stable.
        files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        let mut removed = 0;
        for (i, (t, path)) in files.iter().enumerate() {
            let old = now.duration_since(*t).unwrap_or_default() > CORRUPT_MAX_AGE;
            if (old || i >= MAX_CORRUPT_FILES) && std::fs::remove_file(path).is_ok() {
                removed += 1;
            }
        }
        self.corrupt_removed += removed;
        removed
    }

    /// `.corrupt` files deleted since the last call (for the self-metric).
    pub fn take_corrupt_removed(&mut self) -> u64 {
        std::mem::take(&mut self.corrupt_removed)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.total
    }

    /// Batches on disk.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes a batch at the end. Returns the points of the oldest files
    /// dropped to stay within the size limit.
    pub fn push(&mut self, body: &[u8], points: u64) -> Result<u64, DiskError> {
        let data = encode_file(body, points);
        let size = data.len() as u64;
        let mut dropped = 0;
        while !self.entries.is_empty() && self.total + size > self.max_bytes {
            dropped += self.drop_oldest();
        }
        if size > self.max_bytes {
            return Ok(dropped + points);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let path = self.dir.join(format!("{seq:020}.{EXT}"));
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(FILE_MODE)
                .open(&tmp)
                .map_err(io(&tmp))?;
            // Exactly 0600 whatever the umask (the create mode is masked).
            f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
                .map_err(io(&tmp))?;
            f.write_all(&data).map_err(io(&tmp))?;
            f.sync_data().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.entries.push_back(Entry {
            seq,
            bytes: size,
            path,
        });
        self.total += size;
        Ok(dropped)
    }

    /// Removes the oldest file; returns its points (0 when unreadable).
    fn drop_oldest(&mut self) -> u64 {
        let Some(e) = self.entries.pop_front() else {
            return 0;
        };
        self.total -= e.bytes;
        let points = std::fs::read(&e.path)
            .ok()
            .and_then(|d| decode_file(&d).ok().map(|(_, p)| p))
            .unwrap_or(0);
        let _ = std::fs::remove_file(&e.path);
        points
    }

    /// Reads the oldest batch. A corrupt file is moved aside and reported
    /// as the error; the caller logs it and calls again for the next one.
    pub fn peek(&mut self) -> Option<Result<DiskBatch, DiskError>> {
        let e = self.entries.front()?.clone();
        let data = match std::fs::read(&e.path) {
            Ok(d) => d,
            Err(source) => {
                self.entries.pop_front();
                self.total -= e.bytes;
                return Some(Err(DiskError::Io {
                    path: e.path,
                    source,
                }));
            }
        };
        match decode_file(&data) {
            Ok((body, points)) => Some(Ok(DiskBatch {
                seq: e.seq,
                body: Bytes::copy_from_slice(body),
                points,
            })),
            Err(reason) => {
                self.entries.pop_front();
                self.total -= e.bytes;
                let aside = e.path.with_extension("corrupt");
                let _ = std::fs::rename(&e.path, &aside);
                self.prune_corrupt(std::time::SystemTime::now());
                Some(Err(DiskError::Corrupt {
                    path: e.path,
                    reason,
                }))
            }
        }
    }

    /// Deletes batch `seq` after delivery (or a permanent refusal).
    pub fn remove(&mut self, seq: u64) {
        if let Some(i) = self.entries.iter().position(|e| e.seq == seq) {
            if let Some(e) = self.entries.remove(i) {
                self.total -= e.bytes;
                let _ = std::fs::remove_file(&e.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_format_rejects_damage() {
        let good = encode_file(b"hello protobuf", 7);
        assert_eq!(decode_file(&good), Ok((&b"hello protobuf"[..], 7)));
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "shorter than the header"),
            (
                "truncated header",
                good[..10].to_vec(),
                "shorter than the header",
            ),
            (
                "truncated payload",
                good[..good.len() - 3].to_vec(),
                "header says",
            ),
            ("bit flip", flipped, "checksum"),
            ("bad magic", bad_magic, "magic"),
        ];
        for (name, data, want) in cases {
            let err = decode_file(&data).unwrap_err();
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn survives_restart_in_order_and_skips_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut q = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            for i in 0..4u8 {
                assert_eq!(q.push(&[i; 100], u64::from(i) + 1).unwrap(), 0);
            }
            assert_eq!(q.len(), 4);
        }
        // Damage the second file, leave a half-written tmp behind.
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let data = std::fs::read(&files[1]).unwrap();
        std::fs::write(&files[1], &data[..data.len() / 2]).unwrap();
        std::fs::write(dir.path().join("00000000000000000099.tmp"), b"partial").unwrap();

        let mut q = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(q.len(), 4);
        let mut got = vec![];
        let mut corrupt = vec![];
        while let Some(r) = q.peek() {
            match r {
                Ok(b) => {
                    got.push((b.body[0], b.points));
                    q.remove(b.seq);
                }
                Err(DiskError::Corrupt { path, .. }) => corrupt.push(path),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, vec![(0, 1), (2, 3), (3, 4)]);
        assert_eq!(corrupt, vec![files[1].clone()]);
        assert!(files[1].with_extension("corrupt").exists());
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
        assert_eq!(q.bytes(), 0);
        // New files continue the sequence after the old ones.
        q.push(b"x", 1).unwrap();
        assert_eq!(q.peek().unwrap().unwrap().seq, 4);
    }

    #[test]
    fn modes_are_0700_and_0600_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let qdir = dir.path().join("q");
        // The finding: umask 000 gave 0666 files. (umask is process-wide;
        // other tests' files are briefly more open, which is harmless.) The
        // directory exists already, too open, as after an older version.
        std::fs::create_dir(&qdir).unwrap();
        std::fs::set_permissions(&qdir, std::fs::Permissions::from_mode(0o777)).unwrap();
        // SAFETY: umask only swaps the process file-mode mask.
        let old = unsafe { libc::umask(0) };
        let mut q = DiskQueue::open(&qdir, 1 << 20).unwrap();
        q.push(b"x", 1).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&qdir), 0o700);
        let files: Vec<_> = std::fs::read_dir(&qdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(mode(&files[0]), 0o600, "{}", files[0].display());
    }

    #[test]
    fn corrupt_files_are_bounded_and_aged_out() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(24 * 3600);
        // (name, age in days)
        let files: Vec<(String, u32)> = (0..12)
            .map(|i| (format!("{i:020}.corrupt"), if i < 2 { 8 } else { i }))
            .collect();
        for (name, age) in &files {
            let p = dir.path().join(name);
            std::fs::write(&p, b"junk").unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            // Half a day younger than `age`, so the 7-day edge is not a race.
            f.set_modified(now - day * *age + day / 2).unwrap();
        }
        let mut q = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        // Past 7 days: the two 8-day-old ones and ages 8..=11. Left are
        // ages 2..=7: 6 files, under the count bound.
        let left: Vec<String> = {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let want: Vec<String> = (2..=7).map(|i| format!("{i:020}.corrupt")).collect();
        assert_eq!(left, want);
        assert_eq!(q.take_corrupt_removed(), 6);
        assert_eq!(q.take_corrupt_removed(), 0);
        // Count bound: 12 fresh ones keep the newest 8.
        for i in 100..112 {
            std::fs::write(dir.path().join(format!("{i:020}.corrupt")), b"j").unwrap();
        }
        // 6 old + 12 new: the newest 8 stay.
        q.prune_corrupt(std::time::SystemTime::now());
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, MAX_CORRUPT_FILES);
        assert_eq!(q.take_corrupt_removed(), 10);
    }

    #[test]
    fn size_limit_drops_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let file = (HEADER + 100) as u64;
        let mut q = DiskQueue::open(dir.path(), file * 3).unwrap();
        let mut dropped = 0;
        for i in 0..5u8 {
            dropped += q.push(&[i; 100], 10).unwrap();
        }
        assert_eq!(dropped, 20);
        assert_eq!(q.len(), 3);
        assert!(q.bytes() <= file * 3);
        assert_eq!(q.peek().unwrap().unwrap().body[0], 2);
    }
}
