//! The device registry: which devices may connect, with which secret, and
//! which patient their readings belong to.
//!
//! It lives in `devices.json` in the data directory. Commands change it
//! under an exclusive file lock and replace the file atomically (write,
//! fsync, rename), so a running server never reads half a file; the server
//! polls it and picks changes up within a second ([`RegistryWatcher`]).
//!
//! Secrets are never stored: only a PBKDF2-HMAC-SHA256 hash (RFC 8018 §5.2)
//! with a random 16-byte salt per device. Generated secrets are 32 random
//! bytes (256 bits); a secret chosen by the operator must be at least 16
//! characters. A successful check is remembered in memory (as a SHA-256 of
//! the secret) so reconnect storms do not pay the key derivation again.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::num::NonZeroU32;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, pbkdf2};
use serde::{Deserialize, Serialize};
use wardflow_model::{DeviceId, PatientId, now_ns};

/// File name of the registry in the data directory.
pub const REGISTRY_FILE: &str = "devices.json";
const LOCK_FILE: &str = "devices.lock";
/// PBKDF2 iterations for new devices. Generated secrets carry 256 bits of
/// entropy, so the iteration count only matters for operator-chosen secrets.
pub const PBKDF2_ITERATIONS: u32 = 20_000;
/// Shortest operator-chosen secret.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("device {0} is already registered (remove it first to re-register)")]
    Exists(DeviceId),
    #[error("device {0} is not registered")]
    NotFound(String),
    #[error("the secret is {len} characters; a chosen secret needs at least {MIN_SECRET_LEN}")]
    WeakSecret { len: usize },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub patient: PatientId,
    /// Hex of the PBKDF2 salt.
    pub salt: String,
    /// Hex of the PBKDF2-HMAC-SHA256 output.
    pub hash: String,
    pub iterations: u32,
    /// When the device was added, ns since the epoch.
    pub added_ns: i64,
}

impl DeviceRecord {
    /// Checks `secret` against the stored hash in constant time.
    pub fn verify(&self, secret: &[u8]) -> bool {
        let (Ok(salt), Ok(hash), Some(iterations)) = (
            hex::decode(&self.salt),
            hex::decode(&self.hash),
            NonZeroU32::new(self.iterations),
        ) else {
            return false;
        };
        pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, secret, &hash).is_ok()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    version: u32,
    devices: Vec<DeviceRecord>,
}

/// The registry as loaded from disk.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    devices: BTreeMap<DeviceId, DeviceRecord>,
}

impl Registry {
    /// Loads the registry of `data_dir`; a missing file is an empty registry.
    pub fn load(data_dir: &Path) -> Result<Registry, RegistryError> {
        let path = data_dir.join(REGISTRY_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Registry::default()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let file: RegistryFile = serde_json::from_str(&text).map_err(|e| RegistryError::Parse {
            path: path.clone(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        Ok(Registry {
            devices: file
                .devices
                .into_iter()
                .map(|d| (d.id.clone(), d))
                .collect(),
        })
    }

    pub fn get(&self, id: &str) -> Option<&DeviceRecord> {
        self.devices.get(id)
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Registers a device. Returns the secret: `secret` if given, otherwise a
    /// newly generated one (shown once; only its hash is kept).
    pub fn add(
        data_dir: &Path,
        id: DeviceId,
        patient: PatientId,
        secret: Option<&str>,
    ) -> Result<String, RegistryError> {
        Self::add_many(data_dir, [(id, patient, secret.map(str::to_string))])
            .map(|mut v| v.pop().expect("one device"))
    }

    /// Registers several devices under one lock and one write.
    pub fn add_many(
        data_dir: &Path,
        devices: impl IntoIterator<Item = (DeviceId, PatientId, Option<String>)>,
    ) -> Result<Vec<String>, RegistryError> {
        let rng = SystemRandom::new();
        with_lock(data_dir, |reg| {
            let mut secrets = Vec::new();
            for (id, patient, secret) in devices {
                if reg.devices.contains_key(&id) {
                    return Err(RegistryError::Exists(id));
                }
                let secret = match secret {
                    Some(s) if s.chars().count() < MIN_SECRET_LEN => {
                        return Err(RegistryError::WeakSecret {
                            len: s.chars().count(),
                        });
                    }
                    Some(s) => s,
                    None => {
                        let mut raw = [0u8; 32];
                        rng.fill(&mut raw).expect("system random source");
                        hex::encode(raw)
                    }
                };
                let mut salt = [0u8; 16];
                rng.fill(&mut salt).expect("system random source");
                let mut hash = [0u8; digest::SHA256_OUTPUT_LEN];
                let iterations = NonZeroU32::new(PBKDF2_ITERATIONS).expect("nonzero");
                pbkdf2::derive(
                    pbkdf2::PBKDF2_HMAC_SHA256,
                    iterations,
                    &salt,
                    secret.as_bytes(),
                    &mut hash,
                );
                reg.devices.insert(
                    id.clone(),
                    DeviceRecord {
                        id,
                        patient,
                        salt: hex::encode(salt),
                        hash: hex::encode(hash),
                        iterations: PBKDF2_ITERATIONS,
                        added_ns: now_ns(),
                    },
                );
                secrets.push(secret);
            }
            Ok(secrets)
        })
    }

    /// Removes a device; its open connections are refused at their next publish.
    pub fn remove(data_dir: &Path, id: &str) -> Result<DeviceRecord, RegistryError> {
        with_lock(data_dir, |reg| {
            reg.devices
                .remove(id)
                .ok_or_else(|| RegistryError::NotFound(id.to_string()))
        })
    }
}

/// Runs `change` on the registry under the exclusive lock, then writes it
/// back atomically if `change` succeeded.
fn with_lock<T>(
    data_dir: &Path,
    change: impl FnOnce(&mut Registry) -> Result<T, RegistryError>,
) -> Result<T, RegistryError> {
    fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    let lock_path = data_dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let mut reg = Registry::load(data_dir)?;
    let out = change(&mut reg)?;
    let file = RegistryFile {
        version: 1,
        devices: reg.devices.into_values().collect(),
    };
    let path = data_dir.join(REGISTRY_FILE);
    let tmp = data_dir.join(format!("{REGISTRY_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    serde_json::to_writer_pretty(&mut f, &file).map_err(|e| io_err(&tmp)(e.into()))?;
    f.write_all(b"\n").map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(data_dir))?;
    drop(lock);
    Ok(out)
}

/// The outcome of a device's CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted {
        patient: PatientId,
    },
    /// Not registered (MQTT v5 0x86 would leak existence; the server answers
    /// both cases alike unless configured otherwise).
    UnknownDevice,
    BadSecret,
}

/// A registry snapshot shared by the server's threads and reloaded when the
/// file changes.
pub struct RegistryWatcher {
    data_dir: PathBuf,
    current: ArcSwap<Registry>,
    /// (inode, modification time, length): every write renames a new file in.
    stamp: Mutex<Option<(u64, SystemTime, u64)>>,
    /// Device id -> (stored hash, SHA-256 of a secret that verified).
    verified: Mutex<HashMap<DeviceId, (String, [u8; 32])>>,
}

impl RegistryWatcher {
    pub fn open(data_dir: &Path) -> Result<Arc<RegistryWatcher>, RegistryError> {
        let w = Arc::new(RegistryWatcher {
            data_dir: data_dir.to_path_buf(),
            current: ArcSwap::from_pointee(Registry::default()),
            stamp: Mutex::new(None),
            verified: Mutex::new(HashMap::new()),
        });
        w.reload_if_changed()?;
        Ok(w)
    }

    /// The registry as of the last reload.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Reloads if the file's modification time or size changed. Returns
    /// whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, RegistryError> {
        let path = self.data_dir.join(REGISTRY_FILE);
        let stamp = fs::metadata(&path).ok().map(|m| {
            (
                m.ino(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
            )
        });
        let mut last = self.stamp.lock();
        if *last == stamp && stamp.is_some() {
            return Ok(false);
        }
        let reg = Registry::load(&self.data_dir)?;
        tracing::info!(devices = reg.len(), "device registry loaded");
        self.current.store(Arc::new(reg));
        *last = stamp;
        Ok(true)
    }

    /// Polls the file every `period` on a background thread for as long as
    /// the watcher lives.
    pub fn spawn_poller(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("registry-watch".into())
            .spawn(move || {
                while let Some(w) = weak.upgrade() {
                    if let Err(e) = w.reload_if_changed() {
                        tracing::warn!(
                            "device registry not reloaded, keeping the previous one: {e}"
                        );
                    }
                    drop(w);
                    std::thread::sleep(period);
                }
            })
            .expect("spawn registry poller");
    }

    /// Checks a device's credentials.
    pub fn authenticate(&self, id: &str, secret: &[u8]) -> AuthOutcome {
        let reg = self.snapshot();
        let Some(record) = reg.get(id) else {
            return AuthOutcome::UnknownDevice;
        };
        let fingerprint: [u8; 32] = digest::digest(&digest::SHA256, secret)
            .as_ref()
            .try_into()
            .expect("32 bytes");
        let cached = self
            .verified
            .lock()
            .get(id)
            .is_some_and(|(hash, fp)| *hash == record.hash && *fp == fingerprint);
        if cached || record.verify(secret) {
            if !cached {
                self.verified
                    .lock()
                    .insert(record.id.clone(), (record.hash.clone(), fingerprint));
            }
            AuthOutcome::Accepted {
                patient: record.patient.clone(),
            }
        } else {
            AuthOutcome::BadSecret
        }
    }

    /// The patient a device is bound to now, if it is still registered.
    pub fn patient_of(&self, id: &str) -> Option<PatientId> {
        self.current.load().get(id).map(|r| r.patient.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(d: &str, p: &str) -> (DeviceId, PatientId) {
        (DeviceId::new(d).unwrap(), PatientId::new(p).unwrap())
    }

    #[test]
    fn add_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let (d, p) = ids("mon-1", "p-1");
        let secret = Registry::add(dir.path(), d.clone(), p.clone(), None).unwrap();
        assert_eq!(secret.len(), 64);
        let text = fs::read_to_string(dir.path().join(REGISTRY_FILE)).unwrap();
        assert!(!text.contains(&secret), "the secret itself is never stored");

        let w = RegistryWatcher::open(dir.path()).unwrap();
        assert_eq!(
            w.authenticate("mon-1", secret.as_bytes()),
            AuthOutcome::Accepted { patient: p.clone() }
        );
        assert_eq!(
            w.authenticate("mon-1", secret.as_bytes()),
            AuthOutcome::Accepted { patient: p }
        );
        assert_eq!(w.authenticate("mon-1", b"wrong"), AuthOutcome::BadSecret);
        assert_eq!(
            w.authenticate("mon-2", secret.as_bytes()),
            AuthOutcome::UnknownDevice
        );

        assert!(matches!(
            Registry::add(dir.path(), d, ids("x", "y").1, None),
            Err(RegistryError::Exists(_))
        ));
        Registry::remove(dir.path(), "mon-1").unwrap();
        assert!(matches!(
            Registry::remove(dir.path(), "mon-1"),
            Err(RegistryError::NotFound(_))
        ));
        w.reload_if_changed().unwrap();
        assert_eq!(
            w.authenticate("mon-1", secret.as_bytes()),
            AuthOutcome::UnknownDevice
        );
    }

    #[test]
    fn chosen_secrets_must_be_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let (d, p) = ids("mon-1", "p-1");
        let err = Registry::add(dir.path(), d.clone(), p.clone(), Some("short")).unwrap_err();
        assert!(matches!(err, RegistryError::WeakSecret { len: 5 }));
        let s = Registry::add(dir.path(), d, p, Some("a-long-enough-secret")).unwrap();
        assert_eq!(s, "a-long-enough-secret");
    }

    #[test]
    fn a_re_registered_device_needs_its_new_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (d, p) = ids("mon-1", "p-1");
        let old = Registry::add(dir.path(), d.clone(), p.clone(), None).unwrap();
        let w = RegistryWatcher::open(dir.path()).unwrap();
        assert!(matches!(
            w.authenticate("mon-1", old.as_bytes()),
            AuthOutcome::Accepted { .. }
        ));
        Registry::remove(dir.path(), "mon-1").unwrap();
        let new = Registry::add(dir.path(), d, p, None).unwrap();
        w.reload_if_changed().unwrap();
        assert_eq!(
            w.authenticate("mon-1", old.as_bytes()),
            AuthOutcome::BadSecret
        );
        assert!(matches!(
            w.authenticate("mon-1", new.as_bytes()),
            AuthOutcome::Accepted { .. }
        ));
    }

    #[test]
    fn a_corrupt_file_names_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(REGISTRY_FILE),
            "{\n  \"version\": 1,\n  \"devices\": [ oops ]\n}",
        )
        .unwrap();
        let err = Registry::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("devices.json:3:"), "{err}");
    }
}
