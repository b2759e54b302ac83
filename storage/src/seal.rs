//! Encryption at rest: per-patient data keys, wrapped by a master key, and
//! the AES-256-GCM sealing of stored values.
//!
//! Each patient has a 256-bit data key (and readings of unbound devices
//! one of their own, [`UNBOUND`]). Data keys are kept only wrapped: sealed
//! with AES-256-GCM under the master key, in `{data}/keys/keyring.json`.
//! The master key comes from a file, an environment variable or a command
//! ([`MasterKeySource`]), so an HSM or a KMS can hand it over; it is never
//! written to the data directory, and a key file inside it is refused.
//!
//! * **Rotation** ([`rotate`]) unwraps every data key with the old master
//!   key and wraps it with the new one; no data is rewritten.
//! * **Erasure** ([`Keyring::erase`]) deletes a patient's wrapped data key
//!   (crypto-shredding): what was sealed under it can no longer be opened
//!   by anyone. The keyring remembers that the generation was erased, and
//!   when, so queries can say so; readings stored later get a new
//!   generation of key.
//!
//! Values are sealed a *run* at a time (all of one patient's rows in one
//! data file, see `writer`): one AES-256-GCM call over the run's values
//! (under a key derived from the data key with HKDF, RFC 5869),
//! with the patient and key generation as associated data, so a run moved
//! to another patient does not open. The 96-bit nonce is synthetic, derived
//! with HMAC-SHA-256 from the data key, the file, the run and its plaintext
//! (the construction of RFC 5297's SIV, with GCM in place of CTR): writing
//! the same rows to the same file again (a write-ahead-log replay after a
//! crash) gives the same bytes, so the audit-trail leaves computed from the
//! sealed columns still match, and two different plaintexts never share a
//! nonce under one key.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ring::aead::{self, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use serde::{Deserialize, Serialize};
use wardflow_ledger_bridge::consent::unhex as parse_hex;
use wardflow_ledger_bridge::hex;

use crate::layout;

/// The key name of readings from devices bound to no patient (not a valid
/// patient id, so it cannot clash with one).
pub const UNBOUND: &str = "*unbound";

/// The directory of the keyring, under the data directory.
pub const KEYS_DIR: &str = "keys";
const KEYRING_FILE: &str = "keyring.json";
const LOCK_FILE: &str = "keyring.lock";
const FORMAT: u32 = 1;

/// The HKDF salt a data key's AES and nonce keys are derived with.
const HKDF_SALT: &[u8] = b"wardflow data key v1";

/// Bytes of a run's seal: key generation (u32 LE), nonce, tag.
pub const SEAL_LEN: usize = 4 + aead::NONCE_LEN + 16;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key: {0}")]
    Master(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unreadable keyring ({what})")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "the master key (id {given}) is not the one this keyring is wrapped with (id {expected})"
    )]
    WrongMaster { given: String, expected: String },
    #[error("the data key of {name} (generation {generation}) does not unwrap: {what}")]
    Unwrap {
        name: String,
        generation: u32,
        what: &'static str,
    },
    #[error("no data key for {0}")]
    NoKey(String),
    #[error("sealed data does not open (wrong key, or altered): {0}")]
    Open(String),
    #[error("randomness unavailable")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file holding 64 hexadecimal digits.
    File(PathBuf),
    /// An environment variable holding 64 hexadecimal digits.
    Env(String),
    /// A shell command that prints 64 hexadecimal digits (an HSM or KMS
    /// client, a secret manager).
    Command(String),
}

impl std::str::FromStr for MasterKeySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", p)) if !p.is_empty() => Ok(Self::File(p.into())),
            Some(("env", v)) if !v.is_empty() => Ok(Self::Env(v.into())),
            Some(("command", c)) if !c.trim().is_empty() => Ok(Self::Command(c.into())),
            _ => Err(format!(
                "'{s}' is not a master key source: use file:PATH, env:VARIABLE or command:COMMAND"
            )),
        }
    }
}

impl std::fmt::Display for MasterKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Env(v) => write!(f, "env:{v}"),
            Self::Command(c) => write!(f, "command:{c}"),
        }
    }
}

/// The master key: it wraps and unwraps data keys, nothing else.
pub struct MasterKey {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    /// Reads the key from its source. `data_dir` is where the store lives:
    /// a key file inside it is refused.
    pub fn load(source: &MasterKeySource, data_dir: &Path) -> Result<MasterKey, KeyError> {
        let text = match source {
            MasterKeySource::File(path) => {
                let inside = match (path.canonicalize(), data_dir.canonicalize()) {
                    (Ok(p), Ok(d)) => p.starts_with(d),
                    _ => false,
                };
                if inside {
                    return Err(KeyError::Master(format!(
                        "{} is inside the data directory {}: keep the master key apart from the data it protects",
                        path.display(),
                        data_dir.display()
                    )));
                }
                std::fs::read_to_string(path)
                    .map_err(|e| KeyError::Master(format!("{}: {e}", path.display())))?
            }
            MasterKeySource::Env(var) => std::env::var(var)
                .map_err(|_| KeyError::Master(format!("environment variable {var} is not set")))?,
            MasterKeySource::Command(cmd) => {
                let out = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| KeyError::Master(format!("running the key command: {e}")))?;
                if !out.status.success() {
                    return Err(KeyError::Master(format!(
                        "the key command failed ({})",
                        out.status
                    )));
                }
                String::from_utf8(out.stdout).map_err(|_| {
                    KeyError::Master("the key command printed something that is not text".into())
                })?
            }
        };
        let bytes = parse_hex32(text.trim()).ok_or_else(|| {
            KeyError::Master(format!(
                "{source}: expected 64 hexadecimal digits (32 bytes; `wardflow keys new-master` makes one)"
            ))
        })?;
        Ok(MasterKey::from_bytes(&bytes))
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> MasterKey {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"wardflow master key id\0".as_slice(), bytes].concat(),
        );
        MasterKey {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte key")),
            id: hex(&digest.as_ref()[..8]),
        }
    }

    /// A fresh random key, as 64 hexadecimal digits.
    pub fn generate_hex() -> Result<String, KeyError> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| KeyError::Random)?;
        Ok(hex(&k))
    }

    /// A public fingerprint of the key (not secret: derived one-way).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, name: &str, generation: u32, key: &[u8; 32]) -> Result<String, KeyError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError::Random)?;
        let mut buf = key.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(name, generation)),
                &mut buf,
            )
            .map_err(|_| KeyError::Random)?;
        Ok(hex(&[nonce.as_slice(), &buf].concat()))
    }

    fn unwrap(&self, name: &str, generation: u32, wrapped: &str) -> Result<[u8; 32], KeyError> {
        let fail = |what| KeyError::Unwrap {
            name: name.to_string(),
            generation,
            what,
        };
        let bytes = parse_hex(wrapped).ok_or_else(|| fail("not hexadecimal"))?;
        if bytes.len() != aead::NONCE_LEN + 32 + 16 {
            return Err(fail("wrong length"));
        }
        let (nonce, rest) = bytes.split_at(aead::NONCE_LEN);
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail("bad nonce"))?,
                Aad::from(wrap_aad(name, generation)),
                &mut buf,
            )
            .map_err(|_| fail("authentication failed"))?;
        Ok(plain.try_into().expect("32 bytes"))
    }
}

fn wrap_aad(name: &str, generation: u32) -> Vec<u8> {
    let mut aad = b"wardflow data key v1\0".to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&generation.to_le_bytes());
    aad
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    parse_hex(s)?.try_into().ok()
}

/// One patient's data key, unwrapped, ready to seal and open.
pub struct DataKey {
    name: String,
    generation: u32,
    aead: LessSafeKey,
    nonces: hmac::Key,
}

impl DataKey {
    fn new(name: &str, generation: u32, bytes: &[u8; 32]) -> DataKey {
        // Two keys from one, with HKDF-SHA-256 (RFC 5869): the AES-256-GCM
        // key and the HMAC key of the synthetic nonces never share material.
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(bytes);
        let aes = prk
            .expand(&[b"aes-256-gcm"], &AES_256_GCM)
            .expect("a 32-byte output");
        let nonces = prk
            .expand(&[b"synthetic nonce"], hmac::HMAC_SHA256)
            .expect("a 32-byte output");
        DataKey {
            name: name.to_string(),
            generation,
            aead: LessSafeKey::new(UnboundKey::from(aes)),
            nonces: hmac::Key::from(nonces),
        }
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn aad(&self, kind: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(kind.len() + self.name.len() + 5);
        aad.extend_from_slice(kind);
        aad.extend_from_slice(self.name.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&self.generation.to_le_bytes());
        aad
    }

    /// Seals `buf` in place. `kind` names what is sealed (it is bound as
    /// associated data with the key's owner); `context` and the plaintext
    /// determine the nonce (see the module comment). Returns the seal:
    /// generation, nonce, tag.
    pub fn seal(&self, kind: &[u8], context: &[u8], buf: &mut [u8]) -> [u8; SEAL_LEN] {
        let mut ctx = hmac::Context::with_key(&self.nonces);
        ctx.update(kind);
        ctx.update(&(context.len() as u64).to_le_bytes());
        ctx.update(context);
        ctx.update(buf);
        let mac = ctx.sign();
        let nonce: [u8; aead::NONCE_LEN] = mac.as_ref()[..aead::NONCE_LEN]
            .try_into()
            .expect("12 bytes");
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(kind)),
                buf,
            )
            .expect("in-memory sealing of a buffer under 64 GiB");
        let mut seal = [0u8; SEAL_LEN];
        seal[..4].copy_from_slice(&self.generation.to_le_bytes());
        seal[4..16].copy_from_slice(&nonce);
        seal[16..].copy_from_slice(tag.as_ref());
        seal
    }

    /// Opens what [`DataKey::seal`] sealed, in place.
    pub fn open(&self, kind: &[u8], seal: &[u8], buf: &mut [u8]) -> Result<(), KeyError> {
        let (nonce, tag) = match seal.get(4..16).zip(seal.get(16..SEAL_LEN)) {
            Some(x) => x,
            None => return Err(KeyError::Open("short seal".into())),
        };
        let tag: [u8; 16] = tag.try_into().expect("16 bytes");
        self.aead
            .open_in_place_separate_tag(
                Nonce::try_assume_unique_for_key(nonce).expect("12 bytes"),
                Aad::from(self.aad(kind)),
                aead::Tag::from(tag),
                buf,
                0..,
            )
            .map(|_| ())
            .map_err(|_| KeyError::Open(format!("{} generation {}", self.name, self.generation)))
    }
}

/// The generation a seal was made with.
pub fn seal_generation(seal: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(seal.get(..4)?.try_into().ok()?))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyEntry {
    generation: u32,
    /// nonce ‖ sealed key ‖ tag, under the master key, in hexadecimal.
    wrapped: String,
    created_at_ns: i64,
}

/// A destroyed data key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erasure {
    pub generation: u32,
    pub erased_at_ns: i64,
    pub by: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyringFile {
    format: u32,
    master_key_id: String,
    keys: BTreeMap<String, KeyEntry>,
    #[serde(default)]
    erased: BTreeMap<String, Vec<Erasure>>,
}

/// Why a data key could not be had for reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Unavailable {
    /// The key was destroyed on request.
    Erased(Erasure),
    /// The keyring never had it (files from another keyring, or a lost one).
    Unknown,
}

struct State {
    file: KeyringFile,
    stamp: Option<Stamp>,
    cache: HashMap<(String, u32), Arc<DataKey>>,
    /// Throwaway keys for rows received before an erasure but stored after
    /// it: random, never written anywhere.
    shredded: HashMap<(String, u32), Arc<DataKey>>,
}

/// The data keys of one data directory.
pub struct Keyring {
    dir: PathBuf,
    master: MasterKey,
    state: Mutex<State>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({}, {:?})", self.dir.display(), self.master)
    }
}

/// An exclusive lock on the keyring (processes and the CLI share it).
struct Lock(File);

impl Lock {
    fn take(dir: &Path) -> Result<Lock, KeyError> {
        let path = dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&path)(std::io::Error::last_os_error()));
        }
        Ok(Lock(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl Keyring {
    /// Opens (or starts) the keyring of `data_dir`. A keyring wrapped with
    /// another master key is refused.
    pub fn open(data_dir: &Path, master: MasterKey) -> Result<Keyring, KeyError> {
        let dir = data_dir.join(KEYS_DIR);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let _lock = Lock::take(&dir)?;
        let (file, stamp) = match read_file(&dir)? {
            Some(x) => x,
            None => {
                let file = KeyringFile {
                    format: FORMAT,
                    master_key_id: master.id.clone(),
                    keys: BTreeMap::new(),
                    erased: BTreeMap::new(),
                };
                let stamp = write_file(&dir, &file)?;
                (file, stamp)
            }
        };
        if file.master_key_id != master.id {
            return Err(KeyError::WrongMaster {
                given: master.id.clone(),
                expected: file.master_key_id,
            });
        }
        Ok(Keyring {
            dir,
            master,
            state: Mutex::new(State {
                file,
                stamp: Some(stamp),
                cache: HashMap::new(),
                shredded: HashMap::new(),
            }),
        })
    }

    /// Opens the keyring of `data_dir` if it has one, without making one:
    /// for commands that only read.
    pub fn open_existing(data_dir: &Path, master: MasterKey) -> Result<Option<Keyring>, KeyError> {
        if !data_dir.join(KEYS_DIR).join(KEYRING_FILE).exists() {
            return Ok(None);
        }
        Keyring::open(data_dir, master).map(Some)
    }

    pub fn master_key_id(&self) -> &str {
        &self.master.id
    }

    /// Rereads the keyring file if another process changed it (an erasure
    /// from the command line), dropping keys it no longer holds.
    pub fn refresh(&self) -> Result<(), KeyError> {
        let mut st = self.state.lock().expect("keyring lock");
        let path = self.dir.join(KEYRING_FILE);
        let now = std::fs::metadata(&path).ok().map(stamp_of);
        if now.is_some() && now == st.stamp {
            return Ok(());
        }
        if let Some((file, stamp)) = read_file(&self.dir)? {
            self.adopt(&mut st, file, stamp)?;
        }
        Ok(())
    }

    fn adopt(&self, st: &mut State, file: KeyringFile, stamp: Stamp) -> Result<(), KeyError> {
        if file.master_key_id != self.master.id {
            return Err(KeyError::WrongMaster {
                given: self.master.id.clone(),
                expected: file.master_key_id,
            });
        }
        st.cache
            .retain(|(name, g), _| file.keys.get(name).is_some_and(|e| e.generation == *g));
        st.file = file;
        st.stamp = Some(stamp);
        Ok(())
    }

    fn cached(&self, st: &mut State, name: &str, e: &KeyEntry) -> Result<Arc<DataKey>, KeyError> {
        let k = (name.to_string(), e.generation);
        if let Some(key) = st.cache.get(&k) {
            return Ok(key.clone());
        }
        let bytes = self.master.unwrap(name, e.generation, &e.wrapped)?;
        let key = Arc::new(DataKey::new(name, e.generation, &bytes));
        st.cache.insert(k, key.clone());
        Ok(key)
    }

    /// The current data key of `name` (a patient id or [`UNBOUND`]), made
    /// and durably recorded first if there is none.
    pub fn key_for_write(&self, name: &str) -> Result<Arc<DataKey>, KeyError> {
        let mut st = self.state.lock().expect("keyring lock");
        if let Some(e) = st.file.keys.get(name).cloned() {
            return self.cached(&mut st, name, &e);
        }
        let _lock = Lock::take(&self.dir)?;
        if let Some((file, stamp)) = read_file(&self.dir)? {
            self.adopt(&mut st, file, stamp)?;
        }
        if let Some(e) = st.file.keys.get(name).cloned() {
            return self.cached(&mut st, name, &e);
        }
        let generation = st
            .file
            .erased
            .get(name)
            .and_then(|v| v.iter().map(|e| e.generation).max())
            .map_or(1, |g| g + 1);
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        let entry = KeyEntry {
            generation,
            wrapped: self.master.wrap(name, generation, &bytes)?,
            created_at_ns: now_ns(),
        };
        let mut file = st.file.clone();
        file.keys.insert(name.to_string(), entry.clone());
        // On disk before anything is sealed with it.
        let stamp = write_file(&self.dir, &file)?;
        st.file = file;
        st.stamp = Some(stamp);
        self.cached(&mut st, name, &entry)
    }

    /// The generation that was erased after a row of `name` received at
    /// `received_ns`, if any: such a row, stored only now (it was in an
    /// interval being flushed, or replayed from the write-ahead log), is
    /// erased with the rest of its generation.
    pub fn erased_after(erasures: &[Erasure], received_ns: i64) -> Option<u32> {
        erasures
            .iter()
            .filter(|e| e.erased_at_ns >= received_ns)
            .min_by_key(|e| e.erased_at_ns)
            .map(|e| e.generation)
    }

    /// A key for sealing rows of an erased `generation`: random, kept only
    /// in memory, so what it seals can never be opened.
    pub fn shredded_key(&self, name: &str, generation: u32) -> Result<Arc<DataKey>, KeyError> {
        let mut st = self.state.lock().expect("keyring lock");
        let k = (name.to_string(), generation);
        if let Some(key) = st.shredded.get(&k) {
            return Ok(key.clone());
        }
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        let key = Arc::new(DataKey::new(name, generation, &bytes));
        st.shredded.insert(k, key.clone());
        Ok(key)
    }

    /// The data key a seal of `name` with `generation` needs.
    pub fn key_for_read(
        &self,
        name: &str,
        generation: u32,
    ) -> Result<Result<Arc<DataKey>, Unavailable>, KeyError> {
        let mut st = self.state.lock().expect("keyring lock");
        if let Some(e) = st.file.keys.get(name).cloned()
            && e.generation == generation
        {
            return self.cached(&mut st, name, &e).map(Ok);
        }
        let erased = st
            .file
            .erased
            .get(name)
            .and_then(|v| v.iter().find(|e| e.generation == generation))
            .cloned();
        Ok(Err(erased.map_or(Unavailable::Unknown, Unavailable::Erased)))
    }

    /// Every erasure of `name`.
    pub fn erasures(&self, name: &str) -> Vec<Erasure> {
        let st = self.state.lock().expect("keyring lock");
        st.file.erased.get(name).cloned().unwrap_or_default()
    }

    /// Destroys the current data key of `patient` (crypto-shredding). The
    /// new keyring is written whole and renamed over the old one, then the
    /// directory is synced: from then on no copy of the key remains in the
    /// data directory. Returns `None` if the patient had no key.
    pub fn erase(
        &self,
        patient: &str,
        by: &str,
        reason: &str,
    ) -> Result<Option<Erasure>, KeyError> {
        let mut st = self.state.lock().expect("keyring lock");
        let _lock = Lock::take(&self.dir)?;
        if let Some((file, stamp)) = read_file(&self.dir)? {
            self.adopt(&mut st, file, stamp)?;
        }
        let mut file = st.file.clone();
        let Some(entry) = file.keys.remove(patient) else {
            return Ok(None);
        };
        let erasure = Erasure {
            generation: entry.generation,
            erased_at_ns: now_ns(),
            by: by.to_string(),
            reason: reason.to_string(),
        };
        file.erased
            .entry(patient.to_string())
            .or_default()
            .push(erasure.clone());
        let stamp = write_file(&self.dir, &file)?;
        st.cache.retain(|(name, _), _| name != patient);
        st.file = file;
        st.stamp = Some(stamp);
        Ok(Some(erasure))
    }

    /// How many data keys have been erased, all patients together.
    pub fn erasure_count(&self) -> usize {
        let st = self.state.lock().expect("keyring lock");
        st.file.erased.values().map(Vec::len).sum()
    }

    /// How many data keys the keyring holds.
    pub fn len(&self) -> usize {
        self.state.lock().expect("keyring lock").file.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Re-wraps every data key of `data_dir` under `new`; no data is rewritten.
/// Returns how many keys were re-wrapped.
pub fn rotate(data_dir: &Path, old: &MasterKey, new: &MasterKey) -> Result<usize, KeyError> {
    let dir = data_dir.join(KEYS_DIR);
    let _lock = Lock::take(&dir)?;
    let Some((mut file, _)) = read_file(&dir)? else {
        return Err(KeyError::Master(format!(
            "{} holds no keyring",
            dir.display()
        )));
    };
    if file.master_key_id != old.id {
        return Err(KeyError::WrongMaster {
            given: old.id.clone(),
            expected: file.master_key_id,
        });
    }
    for (name, e) in file.keys.iter_mut() {
        let bytes = old.unwrap(name, e.generation, &e.wrapped)?;
        e.wrapped = new.wrap(name, e.generation, &bytes)?;
    }
    file.master_key_id = new.id.clone();
    write_file(&dir, &file)?;
    Ok(file.keys.len())
}

/// When a keyring file was last written, its size and inode: how a change
/// by another process is noticed.
type Stamp = (SystemTime, u64, u64);

fn stamp_of(m: std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    // Every write renames a new file into place: a new inode.
    (
        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        m.len(),
        m.ino(),
    )
}

fn read_file(dir: &Path) -> Result<Option<(KeyringFile, Stamp)>, KeyError> {
    let path = dir.join(KEYRING_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let stamp = stamp_of(file.metadata().map_err(io(&path))?);
    let parsed: KeyringFile =
        serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| KeyError::Corrupt {
            path: path.clone(),
            what: e.to_string(),
        })?;
    if parsed.format != FORMAT {
        return Err(KeyError::Corrupt {
            path,
            what: format!("format {} (this build reads {FORMAT})", parsed.format),
        });
    }
    Ok(Some((parsed, stamp)))
}

fn write_file(dir: &Path, file: &KeyringFile) -> Result<Stamp, KeyError> {
    let path = dir.join(KEYRING_FILE);
    let json = serde_json::to_vec_pretty(file).map_err(|e| KeyError::Corrupt {
        path: path.clone(),
        what: e.to_string(),
    })?;
    layout::write_atomically(&path, |f| f.write_all(&json)).map_err(io(&path))?;
    layout::sync_dir(dir).map_err(io(dir))?;
    Ok(stamp_of(std::fs::metadata(&path).map_err(io(&path))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(b: u8) -> MasterKey {
        MasterKey::from_bytes(&[b; 32])
    }

    #[test]
    fn seal_opens_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(dir.path(), master(1)).unwrap();
        let key = ring.key_for_write("p-1").unwrap();
        let plain: Vec<u8> = (0..64).collect();
        let mut a = plain.clone();
        let mut b = plain.clone();
        let sa = key.seal(b"readings", b"file-1", &mut a);
        let sb = key.seal(b"readings", b"file-1", &mut b);
        assert_eq!((sa, &a), (sb, &b), "same file, same rows, same bytes");
        assert_ne!(a, plain);
        let mut c = plain.clone();
        let sc = key.seal(b"readings", b"file-2", &mut c);
        assert_ne!(sa[4..16], sc[4..16], "another file gets another nonce");
        key.open(b"readings", &sa, &mut a).unwrap();
        assert_eq!(a, plain);
        // Altered ciphertext, or another kind, does not open.
        b[0] ^= 1;
        assert!(key.open(b"readings", &sb, &mut b).is_err());
        assert!(key.open(b"deadletters", &sc, &mut c).is_err());
    }

    #[test]
    fn another_patients_key_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(dir.path(), master(1)).unwrap();
        let (k1, k2) = (
            ring.key_for_write("p-1").unwrap(),
            ring.key_for_write("p-2").unwrap(),
        );
        let mut buf = 72.5f64.to_le_bytes();
        let seal = k1.seal(b"readings", b"f", &mut buf);
        assert!(k2.open(b"readings", &seal, &mut buf).is_err());
    }

    #[test]
    fn keys_survive_reopening_and_wrong_master_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = 98.25f64.to_le_bytes();
        let seal = {
            let ring = Keyring::open(dir.path(), master(1)).unwrap();
            ring.key_for_write("p-1")
                .unwrap()
                .seal(b"r", b"f", &mut buf)
        };
        let err = Keyring::open(dir.path(), master(2)).unwrap_err();
        assert!(matches!(err, KeyError::WrongMaster { .. }), "{err}");
        let ring = Keyring::open(dir.path(), master(1)).unwrap();
        let key = ring.key_for_read("p-1", 1).unwrap().unwrap();
        key.open(b"r", &seal, &mut buf).unwrap();
        assert_eq!(f64::from_le_bytes(buf), 98.25);
        // The keyring file holds no key in the clear.
        let text = std::fs::read_to_string(dir.path().join("keys/keyring.json")).unwrap();
        assert!(text.contains("\"p-1\"") && text.contains(ring.master_key_id()));
    }

    #[test]
    fn rotation_rewraps_without_changing_data_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = 36.6f64.to_le_bytes();
        let seal = {
            let ring = Keyring::open(dir.path(), master(1)).unwrap();
            ring.key_for_write("p-1")
                .unwrap()
                .seal(b"r", b"f", &mut buf)
        };
        let before = std::fs::read_to_string(dir.path().join("keys/keyring.json")).unwrap();
        assert!(
            rotate(dir.path(), &master(9), &master(2)).is_err(),
            "old key checked"
        );
        assert_eq!(rotate(dir.path(), &master(1), &master(2)).unwrap(), 1);
        let after = std::fs::read_to_string(dir.path().join("keys/keyring.json")).unwrap();
        assert_ne!(before, after);
        assert!(Keyring::open(dir.path(), master(1)).is_err());
        let ring = Keyring::open(dir.path(), master(2)).unwrap();
        let key = ring.key_for_read("p-1", 1).unwrap().unwrap();
        key.open(b"r", &seal, &mut buf).unwrap();
        assert_eq!(f64::from_le_bytes(buf), 36.6);
    }

    #[test]
    fn erasure_destroys_the_key_and_later_writes_get_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(dir.path(), master(1)).unwrap();
        let old = ring.key_for_write("p-1").unwrap();
        ring.key_for_write("p-2").unwrap();
        let mut buf = 61.0f64.to_le_bytes();
        let seal = old.seal(b"r", b"f", &mut buf);
        // Erased from another handle (the command line), seen on refresh.
        let cli = Keyring::open(dir.path(), master(1)).unwrap();
        let e = cli
            .erase("p-1", "admin", "patient request")
            .unwrap()
            .unwrap();
        assert_eq!(e.generation, 1);
        assert!(cli.erase("p-9", "admin", "x").unwrap().is_none());
        ring.refresh().unwrap();
        match ring
            .key_for_read("p-1", seal_generation(&seal).unwrap())
            .unwrap()
        {
            Err(Unavailable::Erased(x)) => assert_eq!(x, e),
            _ => panic!("the erased key is still there"),
        }
        assert!(ring.key_for_read("p-2", 1).unwrap().is_ok());
        assert_eq!(ring.key_for_write("p-1").unwrap().generation(), 2);
        // A fresh handle cannot open the old seal with any key it holds.
        let fresh = Keyring::open(dir.path(), master(1)).unwrap();
        for (name, g) in [("p-1", 2), ("p-2", 1)] {
            let k = fresh.key_for_read(name, g).unwrap().unwrap();
            let mut b = buf;
            assert!(k.open(b"r", &seal, &mut b).is_err());
        }
    }

    #[test]
    fn master_key_sources() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let hexkey = MasterKey::generate_hex().unwrap();
        let outside = dir.path().join("master.key");
        std::fs::write(&outside, format!("{hexkey}\n")).unwrap();
        let a = MasterKey::load(&MasterKeySource::File(outside.clone()), &data).unwrap();
        let b = MasterKey::load(
            &format!("command:cat {}", outside.display())
                .parse()
                .unwrap(),
            &data,
        )
        .unwrap();
        assert_eq!(a.id(), b.id());
        let inside = data.join("master.key");
        std::fs::write(&inside, &hexkey).unwrap();
        let err = MasterKey::load(&MasterKeySource::File(inside), &data).unwrap_err();
        assert!(
            err.to_string().contains("inside the data directory"),
            "{err}"
        );
        std::fs::write(&outside, "not a key").unwrap();
        assert!(MasterKey::load(&MasterKeySource::File(outside), &data).is_err());
        assert!("disk:/x".parse::<MasterKeySource>().is_err());
        assert!(MasterKey::load(&MasterKeySource::Command("exit 3".into()), &data).is_err());
    }
}
