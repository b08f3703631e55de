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
//! still delivered.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use bytes::Bytes;

const MAGIC: &[u8; 8] = b"PERCHQ01";
const HEADER: usize = 24;
const EXT: &str = "otlpq";

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
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut entries = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
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
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            entries: entries.into(),
            total,
            next_seq,
        })
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
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
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
