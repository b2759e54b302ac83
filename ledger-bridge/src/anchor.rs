//! The local anchor log: where batch hashes are anchored when no chain is
//! configured (local mode).
//!
//! Each sealed batch is appended as one JSON line holding its header, its
//! batch hash, the node's Ed25519 public key and the node's signature over
//! `"wardflow-anchor/1" || batch hash` (ring's Ed25519, RFC 8032). Lines are
//! fsynced as they are written. Reading the log back checks every signature
//! and the chain of batch hashes ([`crate::check_chain`]).
//!
//! What local mode does not give: the log and the key live on the node, so
//! whoever controls the node can rewrite both, re-sign every batch and
//! leave no trace. Local mode detects accidental damage and tampering by
//! anyone without the key; only anchoring on a chain that others run makes
//! the history independent of the hospital.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

use crate::batch::{BatchHeader, ChainError, check_chain};
use crate::merkle::Hash;

/// The domain of anchor signatures.
const SIGNED_PREFIX: &[u8] = b"wardflow-anchor/1";

#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an Ed25519 key (PKCS#8): {what}")]
    Key { path: PathBuf, what: String },
    #[error("{path}:{line}: {what}")]
    Bad {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{path}: {source}")]
    Chain {
        path: PathBuf,
        #[source]
        source: ChainError,
    },
}

/// Every whole line of a JSON-lines file, parsed; a missing file is empty
/// and a torn last line (no line break: a crash mid-append) is skipped.
pub fn read_json_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, AnchorError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    text[..complete]
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| AnchorError::Bad {
                path: path.to_path_buf(),
                line: i + 1,
                what: e.to_string(),
            })
        })
        .collect()
}

/// Appends `values` to a JSON-lines file as whole lines, in one write, and
/// fsyncs it (creating the file and its directory if needed).
pub fn append_json_lines<T: serde::Serialize>(
    path: &Path,
    values: &[T],
) -> Result<(), AnchorError> {
    use std::io::Write as _;
    let mut buf = Vec::new();
    for v in values {
        serde_json::to_writer(&mut buf, v).map_err(|e| io_err(path)(e.into()))?;
        buf.push(b'\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(&buf).map_err(io_err(path))?;
    f.sync_data().map_err(io_err(path))
}

/// Follows a JSON-lines file another process appends to: each
/// [`JsonLinesTail::poll`] returns the whole lines added since the last
/// (a line still being written waits for the next call; a line that does
/// not parse is skipped with a warning).
pub struct JsonLinesTail {
    path: PathBuf,
    offset: u64,
}

impl JsonLinesTail {
    pub fn new(path: PathBuf) -> Self {
        Self { path, offset: 0 }
    }

    pub fn poll<T: serde::de::DeserializeOwned>(&mut self) -> Vec<T> {
        use std::io::{Read as _, Seek as _};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // Replaced by a shorter file: read it again from the start.
            self.offset = 0;
        }
        if len == self.offset || f.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.take(len - self.offset).read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        buf[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| match serde_json::from_slice(l) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "a line that does not parse is skipped: {e}");
                    None
                }
            })
            .collect()
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AnchorError + '_ {
    move |source| AnchorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The node's signing key, kept as a PKCS#8 file readable by its owner only.
pub struct NodeKey {
    pair: Ed25519KeyPair,
}

impl NodeKey {
    /// Loads the key at `path`, or creates it there.
    pub fn load_or_create(path: &Path) -> Result<NodeKey, AnchorError> {
        let bad = |what: String| AnchorError::Key {
            path: path.to_path_buf(),
            what,
        };
        let doc = match std::fs::read(path) {
            Ok(doc) => doc,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| bad(e.to_string()))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                }
                write_private(path, doc.as_ref())?;
                // Whichever process created it first: read what is there.
                std::fs::read(path).map_err(io_err(path))?
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&doc).map_err(|e| bad(e.to_string()))?;
        Ok(NodeKey { pair })
    }

    /// Loads the key at `path`; `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<NodeKey>, AnchorError> {
        if !path.exists() {
            return Ok(None);
        }
        Self::load_or_create(path).map(Some)
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes")
    }

    fn sign(&self, batch_hash: &Hash) -> [u8; 64] {
        let msg = [SIGNED_PREFIX, batch_hash.as_slice()].concat();
        self.pair
            .sign(&msg)
            .as_ref()
            .try_into()
            .expect("Ed25519 signatures are 64 bytes")
    }
}

/// Creates `path` with `bytes`, readable by its owner only, unless it
/// exists: then it is left alone. Another process sharing the data
/// directory may be creating it at the same moment; the file appears
/// whole (written under a temporary name, then linked into place) or not
/// at all, and the first one wins.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AnchorError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map_err(io_err(path))
}

/// One anchored batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub process: u32,
    pub batch: u64,
    pub from_ms: u64,
    pub to_ms: u64,
    pub leaves: u64,
    #[serde(with = "hex32")]
    pub root: Hash,
    #[serde(with = "hex32")]
    pub prev: Hash,
    #[serde(with = "hex32")]
    pub batch_hash: Hash,
    #[serde(with = "hex32")]
    pub public_key: [u8; 32],
    #[serde(with = "hex64")]
    pub signature: [u8; 64],
}

impl Anchor {
    pub fn header(&self) -> BatchHeader {
        BatchHeader {
            process: self.process,
            number: self.batch,
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            leaves: self.leaves,
            root: self.root,
            prev: self.prev,
        }
    }

    /// Whether the batch hash matches the header and the signature is the
    /// key's over it.
    pub fn is_valid(&self) -> bool {
        if self.header().hash() != self.batch_hash {
            return false;
        }
        let msg = [SIGNED_PREFIX, self.batch_hash.as_slice()].concat();
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.public_key)
            .verify(&msg, &self.signature)
            .is_ok()
    }
}

/// An append-only anchor log file.
pub struct AnchorLog {
    path: PathBuf,
    file: File,
}

impl AnchorLog {
    /// Opens (creating) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<AnchorLog, AnchorError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        // A torn last line (a crash mid-append) is cut, or the next line
        // would continue it. Lines are far shorter than the tail read here.
        const TAIL: u64 = 8 << 10;
        let len = file.metadata().map_err(io_err(path))?.len();
        let start = len.saturating_sub(TAIL);
        let mut tail = vec![0; (len - start) as usize];
        file.read_exact_at(&mut tail, start).map_err(io_err(path))?;
        let complete = tail
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(start, |i| start + i as u64 + 1);
        if complete < len {
            file.set_len(complete).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        Ok(AnchorLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Signs and appends a batch header; durable on return.
    pub fn append(&mut self, key: &NodeKey, header: &BatchHeader) -> Result<Anchor, AnchorError> {
        let batch_hash = header.hash();
        let anchor = Anchor {
            process: header.process,
            batch: header.number,
            from_ms: header.from_ms,
            to_ms: header.to_ms,
            leaves: header.leaves,
            root: header.root,
            prev: header.prev,
            batch_hash,
            public_key: key.public_key(),
            signature: key.sign(&batch_hash),
        };
        let mut line = serde_json::to_vec(&anchor).expect("an anchor serializes");
        line.push(b'\n');
        self.file.write_all(&line).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        Ok(anchor)
    }

    /// Reads and checks a whole log: each line parses, carries a valid
    /// signature by `expected_key` (when given), and the batches form one
    /// chain. A torn last line (no line break: a crash mid-append, never
    /// reported as anchored) is skipped.
    pub fn read(path: &Path, expected_key: Option<&[u8; 32]>) -> Result<Vec<Anchor>, AnchorError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(path)(e)),
        };
        let bad = |line: usize, what: String| AnchorError::Bad {
            path: path.to_path_buf(),
            line,
            what,
        };
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let lines: Vec<&str> = text[..complete].lines().collect();
        let mut out = Vec::with_capacity(lines.len());
        for (i, text) in lines.iter().enumerate() {
            let anchor: Anchor =
                serde_json::from_str(text).map_err(|e| bad(i + 1, e.to_string()))?;
            if !anchor.is_valid() {
                return Err(bad(
                    i + 1,
                    format!(
                        "batch {}: the signature or batch hash does not verify",
                        anchor.batch
                    ),
                ));
            }
            if expected_key.is_some_and(|k| *k != anchor.public_key) {
                return Err(bad(
                    i + 1,
                    format!("batch {}: signed by another key", anchor.batch),
                ));
            }
            out.push(anchor);
        }
        let headers: Vec<BatchHeader> = out.iter().map(Anchor::header).collect();
        check_chain(&headers).map_err(|source| AnchorError::Chain {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(out)
    }
}

fn from_hex<const N: usize>(s: &str) -> Result<[u8; N], String> {
    if s.len() != 2 * N {
        return Err(format!("expected {} hex digits, found {}", 2 * N, s.len()));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

macro_rules! hex_serde {
    ($name:ident, $n:literal) => {
        mod $name {
            use serde::{Deserialize as _, Deserializer, Serializer};

            pub fn serialize<S: Serializer>(v: &[u8; $n], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&crate::hex(v))
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; $n], D::Error> {
                let s = String::deserialize(d)?;
                super::from_hex::<$n>(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_serde!(hex32, 32);
hex_serde!(hex64, 64);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Sealer;
    use crate::leaf_hash;

    fn sealed(n: u64) -> Vec<BatchHeader> {
        let mut s = Sealer::new(0, None);
        (0..n)
            .map(|i| {
                s.seal(i * 1000, (i + 1) * 1000, vec![leaf_hash(&i.to_be_bytes())])
                    .header
            })
            .collect()
    }

    #[test]
    fn anchors_are_signed_chained_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = NodeKey::load_or_create(&dir.path().join("node.pk8")).unwrap();
        let again = NodeKey::load_or_create(&dir.path().join("node.pk8")).unwrap();
        assert_eq!(key.public_key(), again.public_key(), "the key is kept");
        let path = dir.path().join("anchors.jsonl");
        let mut log = AnchorLog::open(&path).unwrap();
        for h in sealed(3) {
            log.append(&key, &h).unwrap();
        }
        let read = AnchorLog::read(&path, Some(&key.public_key())).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read[2].header(), sealed(3)[2]);
        let other = NodeKey::load_or_create(&dir.path().join("other.pk8")).unwrap();
        let err = AnchorLog::read(&path, Some(&other.public_key())).unwrap_err();
        assert!(
            err.to_string()
                .contains(":1: batch 0: signed by another key"),
            "{err}"
        );
    }

    #[test]
    fn an_edited_deleted_or_torn_line_is_caught_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let key = NodeKey::load_or_create(&dir.path().join("node.pk8")).unwrap();
        let path = dir.path().join("anchors.jsonl");
        let mut log = AnchorLog::open(&path).unwrap();
        for h in sealed(4) {
            log.append(&key, &h).unwrap();
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        // A root changed (and the batch hash with it): the signature fails.
        let a: Anchor = serde_json::from_str(lines[1]).unwrap();
        let mut forged = a.clone();
        forged.root[0] ^= 1;
        forged.batch_hash = forged.header().hash();
        let edited = [
            lines[0].to_string(),
            serde_json::to_string(&forged).unwrap(),
            lines[2].to_string(),
            lines[3].to_string(),
        ]
        .join("\n");
        std::fs::write(&path, edited + "\n").unwrap();
        let err = AnchorLog::read(&path, None).unwrap_err();
        assert!(
            err.to_string().contains(":2: batch 1: the signature"),
            "{err}"
        );

        // A whole batch deleted: the chain names it.
        std::fs::write(&path, [lines[0], lines[1], lines[3]].join("\n") + "\n").unwrap();
        let err = AnchorLog::read(&path, None).unwrap_err();
        assert!(err.to_string().contains("batch 2 is missing"), "{err}");

        // A torn last line is skipped; the rest stands, and appending
        // after it starts a fresh line.
        std::fs::write(&path, text.clone() + &lines[0][..20]).unwrap();
        assert_eq!(AnchorLog::read(&path, None).unwrap().len(), 4);
        let mut log = AnchorLog::open(&path).unwrap();
        let mut sealer = crate::batch::Sealer::new(0, Some(&sealed(4)[3]));
        let next = sealer.seal(4000, 5000, vec![leaf_hash(b"4")]).header;
        log.append(&key, &next).unwrap();
        assert_eq!(AnchorLog::read(&path, None).unwrap().len(), 5);
    }
}
